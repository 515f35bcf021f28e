"""Any metric of a run, recomputed from its per-case predictions (predictions.csv), without the model:

    python -m greenlab.compare --recompute RUN_DIR [RUN_DIR ...] --out DIR

One row per run, evaluation, dataset, task and fold ("all": every fold pooled): the number of cases labelled
with one of the task's classes, AUROC (binary, or the macro mean of one-vs-rest), AUPRC likewise, accuracy,
balanced accuracy, top-label ECE (15 bins, equal width and equal mass) and the Brier score: the same functions
the evaluations use (greenlab/evaluation/statistics.py), so a row's AUROC equals the run's point estimate.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sklearn.metrics import accuracy_score, balanced_accuracy_score

from greenlab.evaluation import calibration, statistics
from greenlab.results.model import MACRO, PREDICTIONS_FILE, Predictions, Results

COLUMNS = ("run", "evaluation", "dataset", "task", "fold", "n", "auroc", "auprc", "accuracy", "balanced_accuracy",
           "ece_width", "ece_mass", "brier")  # fmt: skip


def metrics(p: Predictions, fold: int | None = None) -> dict:
    """The metrics of one task's labelled cases (of one fold when given)."""
    y, proba, classes = calibration.scored(p)
    if fold is not None:
        keep = p.folds[calibration.labelled(p)] == fold
        y, proba = y[keep], proba[keep]
    predicted = classes[proba.argmax(1)]
    return {
        "evaluation": p.evaluation, "dataset": p.dataset, "task": p.task,
        "fold": "all" if fold is None else fold, "n": int(len(y)),
        "auroc": statistics.one_vs_rest_auroc(y, proba, classes)[MACRO],
        "auprc": statistics.one_vs_rest_auprc(y, proba, classes)[MACRO],
        "accuracy": float(accuracy_score(y, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "ece_width": statistics.reliability(y, proba, classes, strategy="width")["ece"],
        "ece_mass": statistics.reliability(y, proba, classes, strategy="mass")["ece"],
        "brier": statistics.brier_score(y, proba, classes),
    }  # fmt: skip


def recompute(run: Path) -> list[dict]:
    """Every task's metrics of a run folder (per fold and pooled where there are folds)."""
    results = Results.from_folder(run)
    if not results.predictions:
        raise FileNotFoundError(f"{run / PREDICTIONS_FILE} not found: the run wrote no per-case predictions")
    rows = []
    for p in results.predictions:
        folds = [] if p.folds is None else sorted(set(p.folds.tolist()))
        rows += [{"run": str(run), **metrics(p, fold)} for fold in [*folds, None]]
    return rows


def write(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
