"""The evaluations a lab asks for (issue #28): per-case predictions, calibration (ECE, Brier, reliability), the
kNN probe; checked against hand computations and scikit-learn on fixed data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from greenlab.analysis import recompute
from greenlab.config import build
from greenlab.evaluation import calibration
from greenlab.evaluation.linear_probe import knn_probabilities
from greenlab.evaluation.statistics import brier_score, calibration_bins, reliability
from greenlab.results.model import Predictions, read_predictions, write_predictions

# binary: p(class 1) per case; top-label confidences 0.9, 0.62, 0.8, 0.55, 0.85; correct T, F, T, F, T
Y = np.array([1, 0, 0, 1, 1])
P1 = np.array([0.9, 0.62, 0.2, 0.45, 0.85])
PROBA = np.stack([1 - P1, P1], 1)


def test_ece_by_hand():
    """Equal width (15 bins): every case alone in its bin, ECE = mean |correct - confidence| =
    (0.1 + 0.62 + 0.2 + 0.55 + 0.15) / 5. Equal mass (2 bins: 3 + 2 cases in confidence order):
    (3 |1/3 - (0.55 + 0.62 + 0.8) / 3| + 2 |1 - 0.875|) / 5."""
    width = reliability(Y, PROBA, np.array([0, 1]), 15, "width")
    assert width["ece"] == pytest.approx(1.62 / 5) and width["count"] == [1] * 5
    mass = reliability(Y, PROBA, np.array([0, 1]), 2, "mass")
    assert mass["ece"] == pytest.approx((3 * abs(1 / 3 - 1.97 / 3) + 2 * 0.125) / 5)
    assert mass["count"] == [3, 2] and mass["accuracy"] == pytest.approx([1 / 3, 1.0])
    assert calibration_bins(np.array([0.0, 1 / 15 - 1e-9, 0.5, 1.0]), 15, "width").tolist() == [0, 0, 7, 14]
    perfect = reliability(
        np.array([0, 1, 1, 1]), np.array([[1.0, 0], [0, 1], [0, 1], [0, 1]]), np.array([0, 1])
    )
    assert perfect["ece"] == 0.0


def test_brier_equals_scikit_learn():
    assert brier_score(Y, PROBA, np.array([0, 1])) == pytest.approx(brier_score_loss(Y, P1))
    rng = np.random.default_rng(0)
    y, proba = rng.integers(0, 4, 40), rng.dirichlet(np.ones(4), 40)
    assert brier_score(y, proba, np.arange(4)) == pytest.approx(
        brier_score_loss(y, proba, labels=np.arange(4))
    )


def test_knn_probe_matches_a_direct_computation():
    """DINO's eval_knn: cosine similarity, the k nearest, votes exp(s / T) per class, normalised."""
    rng = np.random.default_rng(1)
    x_train, y_train, x_test = rng.normal(size=(30, 6)), rng.integers(0, 3, 30), rng.normal(size=(7, 6))
    got = knn_probabilities(x_train, y_train, x_test, np.arange(3), k=5, temperature=0.07)
    for i, x in enumerate(x_test):
        cosine = [x @ t / np.linalg.norm(x) / np.linalg.norm(t) for t in x_train]
        votes = np.zeros(3)
        for j in sorted(range(30), key=lambda j: -cosine[j])[:5]:
            votes[y_train[j]] += np.exp(cosine[j] / 0.07)
        assert got[i] == pytest.approx(votes / votes.sum())


def test_knn_probe_beside_the_regression():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 2, 120), rng.integers(0, 2, 60)
    signal = lambda y: rng.normal(0, 1, (len(y), 8)) + 2.0 * y[:, None]  # noqa: E731
    probe = build(
        "evaluation/linear_probe", bootstrap_resamples=20, ci_resamples=20, knn={"k": 20, "temperature": 0.07}
    )
    record, draws, (test, proba, classes) = probe.knn_task(signal(y_train), y_train, signal(y_test), y_test)
    assert (
        record["auroc_point"] == pytest.approx(roc_auc_score(y_test, proba[:, 1])) and record["auroc"] > 0.9
    )
    assert draws["macro"].shape == (20,) and test.all() and classes.tolist() == [0, 1]


def test_predictions_round_trip_and_recompute_the_metrics(tmp_path):
    """predictions.csv: a row per case, a score column per class of any task (blank elsewhere), folds kept."""
    rng = np.random.default_rng(2)
    three = rng.dirichlet(np.ones(3), 9)
    written = [
        Predictions(
            "linear_probe", "set", "lesion", ["0", "1"], np.array(["a", "b", "c", "d", "e"]), Y, PROBA
        ),
        Predictions(
            "finetune",
            "set",
            "grade",
            ["0", "1", "2"],
            np.array([f"i{k}" for k in range(9)]),
            np.array([0, 1, 2] * 3),
            three,
            np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]),
        ),  # fmt: skip
    ]
    path = tmp_path / "predictions.csv"
    write_predictions(written, path)
    header, first = path.read_text().splitlines()[:2]
    assert header == "evaluation,dataset,task,fold,id,label,score_0,score_1,score_2" and first.endswith(",")
    back = read_predictions(path)
    assert [p.task for p in back] == ["lesion", "grade"] and back[0].folds is None
    assert back[1].folds.tolist() == written[1].folds.tolist() and back[1].classes == ["0", "1", "2"]
    assert np.allclose(back[1].scores, three) and back[0].ids.tolist() == ["a", "b", "c", "d", "e"]
    row = recompute.metrics(back[0])
    assert row["auroc"] == roc_auc_score(Y, P1) and row["ece_width"] == pytest.approx(1.62 / 5)
    assert row["brier"] == pytest.approx(brier_score_loss(Y, P1)) and row["n"] == 5
    assert recompute.metrics(back[1], fold=2)["n"] == 3
    summary = calibration.summary(back)
    assert set(summary) == {"linear_probe/set/lesion", "finetune/set/grade"}
    assert summary["linear_probe/set/lesion"]["ece_width"] == pytest.approx(1.62 / 5)
    assert [p.name for p in calibration.plot(summary, tmp_path)] == [
        "linear_probe_set_lesion.png",
        "finetune_set_grade.png",
    ]


def test_a_bad_predictions_file_is_named(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_text("id,score\n1,0.5\n")
    with pytest.raises(ValueError, match=r"predictions.csv: not a greenlab predictions file"):
        read_predictions(path)
