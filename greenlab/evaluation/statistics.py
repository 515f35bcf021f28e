"""Scores of one label task and their bootstrap distributions (RETFound-Green's statistics).

A task's comparisons: a binary task is one; a multi-class task is one per class (one-vs-rest AUROC) plus
their macro mean. Each comparison's AUROC is resampled ``resamples`` times (the held-out set drawn with
replacement as the official ``get_bootstrap_aucs``, Training_and_eval_code/evaluation/Eval_*.ipynb: a fresh
``np.random.RandomState(seed)``, then ``rng.choice(idxs, size=len(idxs), replace=True)`` per resample; further
resamples continue the same stream); the paper headlines the median of 100 such resamples and counts a "win"
when a Wilcoxon signed-rank test between two models' resample vectors gives p < 0.05. The resample index sets
depend only on (seed, held-out size), so two models scored on the same held-out set are paired resample by
resample, and on the official code's predictions the first 100 are its resamples.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wilcoxon
from sklearn.metrics import average_precision_score, roc_auc_score

from greenlab.results.model import MACRO


def one_vs_rest_auroc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """{comparison: AUROC}: binary -> {"macro": AUROC of classes[1]}; multi-class -> one entry per class
    (its one-vs-rest AUROC; NaN when the class is absent or alone in ``y``) and "macro", their mean over the
    scorable classes.

    y: (N,) labels; proba: (N, K) class probabilities, columns in ``classes`` order.
    """
    return _one_vs_rest(_auroc, y, proba, classes)


def one_vs_rest_auprc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """As ``one_vs_rest_auroc`` with average precision (area under the precision-recall curve)."""
    return _one_vs_rest(_auprc, y, proba, classes)


def _one_vs_rest(score, y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """``score(positive, probability)`` of classes[1] (binary) or of each class and their macro mean."""
    if len(classes) == 2:
        return {MACRO: score(y == classes[1], proba[:, 1])}
    per_class = {str(c): score(y == c, proba[:, k]) for k, c in enumerate(classes)}
    scored = [v for v in per_class.values() if not np.isnan(v)]
    return {**per_class, MACRO: float(np.mean(scored)) if scored else float("nan")}


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices of the held-out set, drawn with replacement: the official bootstrap's
    (``RandomState(seed)``, one ``choice`` of n of ``range(n)`` per resample)."""
    if not resamples:
        return np.zeros((0, n), int)
    rng, idxs = np.random.RandomState(seed), list(range(n))
    return np.stack([rng.choice(idxs, size=len(idxs), replace=True) for _ in range(resamples)])


def bootstrap_auroc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, indices: np.ndarray) -> dict:
    """{comparison: (R,) float array}: each comparison's AUROC on each resample (NaN where unscorable)."""
    draws = [one_vs_rest_auroc(y[i], proba[i], classes) for i in indices]
    keys = one_vs_rest_auroc(y, proba, classes).keys()
    return {k: np.array([d[k] for d in draws], dtype=np.float64) for k in keys}


def summarise(draws: np.ndarray, headline_resamples: int, interval_resamples: int) -> dict:
    """Median of the first ``headline_resamples`` draws (the paper's headline) and the 2.5 / 97.5
    percentiles of the first ``interval_resamples`` (the 95 % interval); NaN draws left out."""
    head, every = draws[:headline_resamples], draws[:interval_resamples]
    head, every = head[~np.isnan(head)], every[~np.isnan(every)]
    return {
        "median": float(np.median(head)) if head.size else float("nan"),
        "ci95": [float(np.percentile(every, 2.5)), float(np.percentile(every, 97.5))] if every.size else None,
        "resamples_scored": int(every.size),
    }


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value between paired resample vectors (scipy defaults, pairs with a
    NaN left out); 1.0 when every pair is equal, NaN when no pair is left."""
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size == 0:
        return float("nan")
    if np.all(a == b):
        return 1.0
    return float(wilcoxon(a, b).pvalue)


def _auroc(positive: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(positive) else float("nan")


def _auprc(positive: np.ndarray, score: np.ndarray) -> float:
    return float(average_precision_score(positive, score)) if positive.any() else float("nan")


CALIBRATION_BINS = 15


def top_label(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence (N,): the largest class probability, correct (N,): whether that class is the label)."""
    return proba.max(1), np.asarray(classes)[proba.argmax(1)] == y


def calibration_bins(confidence: np.ndarray, bins: int, strategy: str) -> np.ndarray:
    """Bin index (N,) of each confidence: ``width`` = ``bins`` equal intervals of [0, 1] (right-closed, the
    first one closed: (0, 1/15] ... as Guo et al. 2017), ``mass`` = ``bins`` groups of (nearly) equal size in
    confidence order (ties kept in their order; ``np.array_split`` sizes)."""
    if strategy == "width":
        return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    if strategy == "mass":
        index = np.empty(len(confidence), int)
        for b, part in enumerate(np.array_split(np.argsort(confidence, kind="stable"), bins)):
            index[part] = b
        return index
    raise ValueError(f"calibration bins: strategy must be width or mass, not {strategy!r}")


def reliability(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, bins: int = CALIBRATION_BINS,
                strategy: str = "width") -> dict:  # fmt: skip
    """Top-label reliability: per non-empty bin its count, mean confidence and accuracy, and the expected
    calibration error ECE = sum_b (n_b / N) |accuracy_b - confidence_b|."""
    confidence, correct = top_label(y, proba, classes)
    index = calibration_bins(confidence, bins, strategy)
    rows = [(int((index == b).sum()), float(confidence[index == b].mean()), float(correct[index == b].mean()))
            for b in range(bins) if (index == b).any()]  # fmt: skip
    ece = sum(n * abs(acc - conf) for n, conf, acc in rows) / len(y) if len(y) else float("nan")
    return {"ece": float(ece), "count": [r[0] for r in rows], "confidence": [r[1] for r in rows],
            "accuracy": [r[2] for r in rows]}  # fmt: skip


def brier_score(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean squared error of the probabilities against the one-hot label: binary, (p_1 - y)^2 averaged
    (= scikit-learn's ``brier_score_loss``); multi-class, the sum over classes averaged over cases (Brier 1950;
    scikit-learn's multi-class ``brier_score_loss``)."""
    onehot = (np.asarray(y)[:, None] == np.asarray(classes)[None, :]).astype(np.float64)
    if len(classes) == 2:
        return float(np.mean((proba[:, 1] - onehot[:, 1]) ** 2))
    return float(np.mean(((proba - onehot) ** 2).sum(1)))
