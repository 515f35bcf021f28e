"""Performance per subgroup (``evaluation.subgroups``: columns of the labels CSV or manifest, e.g. sex, age_band,
site), from every evaluation's per-case predictions.

For each scored task and each subgroup column: per value, the AUROC (binary, or the macro mean of one-vs-rest)
of the cases with that value, with a 95 % interval from ``resamples`` bootstrap resamples of those cases; and
the largest gap between two values' AUROCs with a paired bootstrap p-value: the whole held-out set is resampled
``resamples`` times (the same draws for both values), the gap recomputed on each, and p = 2 x the smaller of
the shares of gaps <= 0 and >= 0 (at most 1). Cases without a value in the column are left out of it.
"""

from __future__ import annotations

import itertools

import numpy as np

from greenlab.evaluation import calibration
from greenlab.evaluation.statistics import one_vs_rest_auroc, resample_indices
from greenlab.results.model import MACRO, Predictions


def _auroc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    return one_vs_rest_auroc(y, proba, classes)[MACRO] if len(np.unique(y)) > 1 else float("nan")


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values.size else None


def by_column(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, values: np.ndarray, resamples: int,
              seed: int) -> dict:  # fmt: skip
    """One column's {"groups": {value: {n, auroc, auroc_ci95}}, "largest_gap": {a, b, gap, p_value} | None}."""
    groups = {}
    for value in sorted(set(values.tolist())):
        rows = np.flatnonzero(values == value)
        draws = [
            _auroc(y[rows[i]], proba[rows[i]], classes) for i in resample_indices(len(rows), resamples, seed)
        ]
        groups[str(value)] = {"n": int(len(rows)), "auroc": _auroc(y[rows], proba[rows], classes),
                              "auroc_ci95": _interval(np.array(draws, dtype=float))}  # fmt: skip
    scored = [(v, g["auroc"]) for v, g in groups.items() if not np.isnan(g["auroc"])]
    if len(scored) < 2:
        return {"groups": groups, "largest_gap": None}
    (a, auroc_a), (b, auroc_b) = max(itertools.combinations(scored, 2), key=lambda p: abs(p[0][1] - p[1][1]))
    gaps = []
    for i in resample_indices(len(y), resamples, seed):
        in_a, in_b = i[values[i] == a], i[values[i] == b]
        gaps.append(_auroc(y[in_a], proba[in_a], classes) - _auroc(y[in_b], proba[in_b], classes))
    gaps = np.array(gaps, dtype=float)
    gaps = gaps[~np.isnan(gaps)]
    p_value = min(1.0, 2 * min((gaps <= 0).mean(), (gaps >= 0).mean())) if gaps.size else float("nan")
    return {"groups": groups, "largest_gap": {"a": a, "b": b, "gap": auroc_a - auroc_b,
                                              "gap_ci95": _interval(gaps), "p_value": float(p_value)}}  # fmt: skip


def analyse(predictions: list[Predictions], metadata: dict[str, dict], columns: list[str], resamples: int = 1000,
            seed: int = 42) -> dict:  # fmt: skip
    """{"<evaluation>/<dataset>/<task>": {column: ``by_column``}} over the cases labelled with a task's class;
    ``metadata``: {case id: {column: value}}."""
    out = {}
    for p in predictions:
        y, proba, classes = calibration.scored(p)
        ids = p.ids[calibration.labelled(p)]
        record = {}
        for column in columns:
            values = np.array([str((metadata.get(str(i)) or {}).get(column) or "") for i in ids])
            known = values != ""
            if known.any():
                record[column] = by_column(y[known], proba[known], classes, values[known], resamples, seed)
        if record:
            out[calibration.key(p)] = record
    return out


def markdown(subgroups: dict) -> list[str]:
    """results.md's subgroup table: per task, column and value the AUROC [95 % CI], and the largest gap."""
    if not subgroups:
        return []
    lines = ["", "## Subgroups (AUROC per value; largest gap with a paired bootstrap p-value)", "",
             "| evaluation / dataset / task | column | value | n | AUROC [95% CI] |", "|---|---|---|---|---|"]  # fmt: skip
    gaps = []
    for name, columns in subgroups.items():
        for column, record in columns.items():
            for value, g in record["groups"].items():
                low, high = g["auroc_ci95"] or (float("nan"), float("nan"))
                lines.append(
                    f"| {name} | {column} | {value} | {g['n']} | {g['auroc']:.3f} [{low:.3f}, {high:.3f}] |"
                )
            gap = record["largest_gap"]
            if gap:
                gaps.append(
                    f"- {name}, {column}: {gap['a']} - {gap['b']} = {gap['gap']:+.3f} (p = {gap['p_value']:.3f})"
                )
    return lines + (["", "Largest gaps:", *gaps] if gaps else [])
