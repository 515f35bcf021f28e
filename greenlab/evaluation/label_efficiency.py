"""How many labels does a task need? Probes fitted on nested, stratified, patient-whole subsets of the training
labels, scored on the same held-out set.

``subsets(labels, groups, fractions, counts, repeats, seed)``: for each repeat, the patients (groups; an item
alone when there are none) are put in one random order, and a subset takes, for every class, the first
patients holding that class in that order until they hold ``ceil(fraction x that class's items)`` items of it,
or ``count`` (at least one), with every item of the patients taken. So a repeat's subsets are nested (each
class's prefix only grows), hold at least each class's share, and never split a patient. The held-out set is
the probe's own, the same for every subset.

Each point (fraction or count) is scored over ``repeats`` subsets x the probe's bootstrap resamples of the
held-out set: the AUROC median and 95 % interval of the pooled draws, the mean number of labels, and the
seconds the fits took (its cost; kWh in results.md at the evaluation phase's measured rate).
"""

from __future__ import annotations

import math

import numpy as np

from greenlab.evaluation import statistics


def subsets(labels: np.ndarray, groups: list[str] | None, fractions: list[float], counts: list[int],
            repeats: int, seed: int) -> dict[str, list[np.ndarray]]:  # fmt: skip
    """{point name ("fraction=0.1", "count=5"): one index array (into ``labels``) per repeat} over the labelled
    items (label >= 0)."""
    labels = np.asarray(labels)
    groups = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(labels))]
    labelled = np.flatnonzero(labels >= 0)
    members: dict[str, list[int]] = {}
    for i in labelled:
        members.setdefault(groups[i], []).append(int(i))
    classes = np.unique(labels[labelled])
    by_class = {c: [g for g, items in members.items() if (labels[items] == c).any()] for c in classes}
    names = list(members)
    size = {c: int((labels[labelled] == c).sum()) for c in classes}
    points = [(f"fraction={f:g}", {c: math.ceil(f * size[c]) for c in classes}) for f in fractions]
    points += [(f"count={n}", {c: min(n, size[c]) for c in classes}) for n in counts]
    chosen = {name: [] for name, _ in points}
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, repeat])
        rank = {names[k]: r for r, k in enumerate(rng.permutation(len(names)))}  # one order of the patients
        order = {c: sorted(by_class[c], key=rank.get) for c in classes}
        for name, wanted in points:
            picked = []
            for c in classes:
                have = 0
                for group in order[c]:
                    if have >= max(wanted[c], 1):
                        break
                    picked += members[group]
                    have += int((labels[members[group]] == c).sum())
            chosen[name].append(np.array(sorted(set(picked)), dtype=int))
    return chosen


def pooled(draws: list[np.ndarray]) -> dict:
    """Median and 95 % interval of the bootstrap AUROCs pooled over repeats (NaN draws left out)."""
    every = np.concatenate(draws) if draws else np.zeros(0)
    summary = statistics.summarise(every, len(every), len(every))
    return {"auroc": summary["median"], "auroc_ci95": summary["ci95"]}


def plot(curves: dict[str, dict], path, title: str) -> None:
    """AUROC (median, 95 % interval) against the training labels used, one line per curve ({name: {point:
    record}}: a task, or a model's task), log-scaled labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        rows = sorted(points.values(), key=lambda r: r["labels"])
        interval = [r["auroc_ci95"] or [r["auroc"], r["auroc"]] for r in rows]
        axis.errorbar([r["labels"] for r in rows], [r["auroc"] for r in rows], marker="o", capsize=3, label=name,
                      yerr=[[r["auroc"] - i[0] for r, i in zip(rows, interval)],
                            [i[1] - r["auroc"] for r, i in zip(rows, interval)]])  # fmt: skip
    axis.set(xscale="log", xlabel="training labels", ylabel="AUROC (median, 95% CI)", title=title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results, key: str, what: str) -> list[str]:
    """results.md's label-efficiency table of ``results.metrics[key]``: per task and point the labels used, AUROC
    [95 % CI], the mean point AUROC, and the cost of one fit (seconds; kWh at the evaluation phase's measured
    rate)."""
    efficiency = results.metrics.get(key)
    if not efficiency:
        return []
    phase = getattr(results, "phases", {}).get("evaluate")
    rate = phase.kwh / phase.seconds if phase and phase.seconds else float("nan")
    lines = ["", f"## Label efficiency ({what})", "",
             "| task | subset | labels | AUROC [95% CI] | point (mean) | fit s | fit kWh |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, points in efficiency.items():
        for point, r in points.items():
            low, high = r["auroc_ci95"] or (float("nan"), float("nan"))
            lines.append(f"| {task} | {point} | {r['labels']:.0f} | {r['auroc']:.3f} [{low:.3f}, {high:.3f}] | "
                         f"{r['auroc_point_mean']:.3f} | {r['fit_seconds']:.2f} | {r['fit_seconds'] * rate:.2e} |")  # fmt: skip
    repeats = next(iter(next(iter(efficiency.values())).values()))["repeats"]
    return lines + ["", f"{repeats} subsets per point (the same held-out cases throughout)."]
