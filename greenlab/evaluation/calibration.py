"""Calibration of every evaluation's per-case probabilities (probes, fine-tuning, zero-shot): top-label expected
calibration error over 15 bins of equal width and of equal mass, the Brier score, and a reliability diagram per
task (greenlab/evaluation/statistics.py holds the maths).

Only the cases labelled with a class of the task are used (a finding's uncertain / missing labels are left
out). ``summary`` gives results.json's ``metrics.calibration``; ``plot`` writes ``calibration/*.png`` in the
run folder (W&B takes the run folder's figures).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from greenlab.evaluation.statistics import CALIBRATION_BINS, brier_score, reliability
from greenlab.results.model import Predictions

FOLDER = "calibration"


def key(p: Predictions) -> str:
    """``<evaluation>/<dataset>/<task>``: how results.json and the figures name one task's calibration."""
    return f"{p.evaluation}/{p.dataset}/{p.task}"


def labelled(p: Predictions) -> np.ndarray:
    """(N,) mask of the cases labelled with one of the task's classes."""
    return np.isin(p.labels, [int(c) for c in p.classes])


def scored(p: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probabilities, classes) of the cases labelled with one of the task's classes."""
    keep = labelled(p)
    return p.labels[keep], p.scores[keep], np.array([int(c) for c in p.classes])


def summary(predictions: list[Predictions], bins: int = CALIBRATION_BINS) -> dict:
    """{key: {n, ece_width, ece_mass, brier, reliability_width, reliability_mass}} of every task with cases."""
    out = {}
    for p in predictions:
        y, proba, classes = scored(p)
        if not len(y):
            continue
        width, mass = (reliability(y, proba, classes, bins, s) for s in ("width", "mass"))
        out[key(p)] = {"n": int(len(y)), "bins": bins, "ece_width": width.pop("ece"), "ece_mass": mass.pop("ece"),
                       "brier": brier_score(y, proba, classes), "reliability_width": width,
                       "reliability_mass": mass}  # fmt: skip
    return out


def plot(calibration: dict, folder: Path) -> list[Path]:
    """One reliability diagram per task (equal-width bins: accuracy against mean confidence, bar width =
    the bin, the diagonal = perfect calibration) in ``folder/calibration``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, record in calibration.items():
        curve = record["reliability_width"]
        figure, axis = plt.subplots(figsize=(3.6, 3.6))
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        axis.bar(
            curve["confidence"], curve["accuracy"], width=1 / record["bins"], alpha=0.6, edgecolor="black"
        )
        axis.plot(curve["confidence"], curve["accuracy"], marker="o", markersize=3)
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy",
                 title=f"{name}\nECE {record['ece_width']:.3f} (width), {record['ece_mass']:.3f} (mass); "
                       f"Brier {record['brier']:.3f}")  # fmt: skip
        axis.title.set_fontsize(7)
        figure.tight_layout()
        path = folder / FOLDER / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def markdown(calibration: dict) -> list[str]:
    """results.md's calibration table."""
    if not calibration:
        return []
    lines = ["", f"## Calibration (top-label ECE, {CALIBRATION_BINS} bins; Brier score)", "",
             "| evaluation / dataset / task | n | ECE (equal width) | ECE (equal mass) | Brier |", "|---|---|---|---|---|"]  # fmt: skip
    for name, r in calibration.items():
        lines.append(f"| {name} | {r['n']} | {r['ece_width']:.3f} | {r['ece_mass']:.3f} | {r['brier']:.3f} |")
    return lines + ["", f"Reliability diagrams: `{FOLDER}/*.png`."]
