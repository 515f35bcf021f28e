"""The evaluations a lab asks for (issue #28): per-case predictions, calibration (ECE, Brier, reliability), the
kNN probe; checked against hand computations and scikit-learn on fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, roc_auc_score

from greenlab.analysis import recompute
from greenlab.config import build
from greenlab.evaluation import calibration, label_efficiency
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


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12)), min_size=6, max_size=80),
    st.integers(0, 10_000),
)
def test_label_subsets_are_nested_stratified_and_keep_patients_whole(rows, seed):
    """Property: for every repeat, the subsets of growing fractions contain each other, hold at least
    ceil(fraction x n_c) items of each class c (at least one), and take a patient whole or not at all."""
    labels = np.array([label for label, _ in rows])
    groups = [f"p{patient}" for _, patient in rows]
    labels[::7] = -1  # some items unlabelled
    fractions = [0.1, 0.25, 0.5, 1.0]
    chosen = label_efficiency.subsets(labels, groups, fractions, [2], repeats=3, seed=seed)
    labelled = labels >= 0
    for repeat in range(3):
        previous = set()
        for f in fractions:
            subset = set(chosen[f"fraction={f:g}"][repeat].tolist())
            assert previous <= subset and all(labelled[i] for i in subset)
            for c in np.unique(labels[labelled]):
                assert sum(labels[i] == c for i in subset) >= max(1, math.ceil(f * (labels == c).sum()))
            patients = {groups[i] for i in subset}
            assert subset == {i for i in np.flatnonzero(labelled) if groups[i] in patients}
            previous = subset
        assert set(chosen["fraction=1"][repeat].tolist()) == set(np.flatnonzero(labelled).tolist())


def test_label_efficiency_refits_on_the_subsets():
    rng = np.random.default_rng(3)
    y_train, y_test = rng.integers(0, 2, 200), rng.integers(0, 2, 80)
    signal = lambda y: rng.normal(0, 1, (len(y), 8)) + 1.5 * y[:, None]  # noqa: E731
    probe = build("evaluation/linear_probe", bootstrap_resamples=20, label_fractions=[0.05, 1.0],
                  label_counts=[3], label_repeats=4)  # fmt: skip
    x_train, x_test = signal(y_train), signal(y_test)
    points = probe.label_efficiency(x_train, y_train, x_test, y_test, None)
    assert list(points) == ["fraction=0.05", "fraction=1", "count=3"]
    assert points["fraction=1"]["labels"] == 200 and points["count=3"]["labels"] == 6
    assert points["fraction=1"]["auroc"] > 0.8 and points["fraction=1"]["repeats"] == 4
    full = probe.probe_task(x_train, y_train, x_test, y_test)[0]
    assert points["fraction=1"]["auroc_point_mean"] == pytest.approx(full["auroc_point"])
    low, high = points["fraction=0.05"]["auroc_ci95"]
    assert low <= points["fraction=0.05"]["auroc"] <= high and points["fraction=0.05"]["fit_seconds"] > 0


def test_label_efficiency_table_and_plot(tmp_path):
    from types import SimpleNamespace

    from greenlab.evaluation.linear_probe import LinearProbe
    from greenlab.results.model import Phase

    point = {"labels": 6.0, "auroc": 0.7, "auroc_ci95": [0.6, 0.8], "auroc_point_mean": 0.71, "fit_seconds": 2.0,
             "repeats": 5}  # fmt: skip
    results = SimpleNamespace(
        experiment="x",
        metrics={
            "probe_label_efficiency": {
                "grade": {"fraction=0.1": point, "fraction=1": {**point, "labels": 60}}
            }
        },
        phases={"evaluate": Phase(seconds=100.0, kwh=0.001, co2e_kg=0.0, energy_method="estimate")},
    )
    lines = label_efficiency.markdown(results, "probe_label_efficiency", "linear probe")
    assert "| grade | fraction=0.1 | 6 | 0.700 [0.600, 0.800] | 0.710 | 2.00 | 2.00e-05 |" in lines
    assert LinearProbe.figures(results, tmp_path) == [tmp_path / "label_efficiency.png"]


def test_subgroup_aurocs_equal_scikit_learn_per_group():
    """Per value: sklearn's AUROC on that value's cases; the largest gap's paired bootstrap p-value is small for
    a real gap and large for none."""
    from greenlab.evaluation import subgroups

    rng = np.random.default_rng(4)
    n = 300
    y = rng.integers(0, 2, n)
    site = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    noise = np.where(site == "c", 3.0, 0.5)  # site c: much noisier scores
    p1 = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1, n) * noise)))
    cases = Predictions("linear_probe", "set", "lesion", ["0", "1"], np.array([f"i{k}" for k in range(n)]), y,
                        np.stack([1 - p1, p1], 1))  # fmt: skip
    metadata = {f"i{k}": {"site": site[k], "sex": "F" if k % 2 else "M"} for k in range(n)}
    metadata["i0"]["sex"] = ""  # unknown: left out of that column
    found = subgroups.analyse([cases], metadata, ["site", "sex"], resamples=200)["linear_probe/set/lesion"]
    for value in "abc":
        rows = site == value
        assert found["site"]["groups"][value]["auroc"] == roc_auc_score(y[rows], p1[rows])
        assert found["site"]["groups"][value]["n"] == rows.sum()
    gap = found["site"]["largest_gap"]
    assert {gap["a"], gap["b"]} == {"a", "c"} or {gap["a"], gap["b"]} == {"b", "c"}
    assert gap["p_value"] < 0.05 and abs(gap["gap"]) > 0.1
    assert sum(g["n"] for g in found["sex"]["groups"].values()) == n - 1
    assert found["sex"]["largest_gap"]["p_value"] > 0.05
    assert any("site" in line for line in subgroups.markdown({"linear_probe/set/lesion": found}))


def test_compare_overlays_label_efficiency(tmp_path):
    from types import SimpleNamespace

    from greenlab.analysis.compare import efficiency_table, plot_efficiency

    point = {"labels": 10.0, "auroc": 0.6, "auroc_ci95": [0.5, 0.7], "auroc_point_mean": 0.6, "fit_seconds": 0.1,
             "repeats": 5}  # fmt: skip
    runs = [SimpleNamespace(name=name, results=SimpleNamespace(metrics=metrics)) for name, metrics in (
        ("tr", {"probe_label_efficiency": {"grade": {"fraction=0.1": point, "fraction=1": {**point, "labels": 100}}}}),
        ("resnet", {"probe_label_efficiency": {"grade": {"fraction=0.1": {**point, "auroc": 0.55}}}}),
        ("none", {}),
    )]  # fmt: skip
    lines = efficiency_table(runs)
    assert (
        "| grade | fraction=0.1 | 0.600 [0.500, 0.700] (10 labels) | 0.550 [0.500, 0.700] (10 labels) |  |"
        in lines
    )
    assert lines[-1].endswith("(100 labels) |  |  |")
    plot_efficiency(runs, tmp_path / "overlay.png")
    assert (tmp_path / "overlay.png").stat().st_size > 1000


def test_knn_rows_are_compared_apart_from_the_regressions():
    from greenlab.results.model import Comparison

    linear, knn = (Comparison(e, "set", "grade", "macro", 0.7) for e in ("linear_probe", "knn_probe"))
    assert linear.key == ("set", "grade", "macro") and knn.key == ("set", "grade [knn_probe]", "macro")
