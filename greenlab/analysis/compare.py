"""Compare models the way RETFound-Green does: bootstrap medians with 95 % intervals per comparison, pairwise
Wilcoxon signed-rank tests on the paired bootstrap vectors, and wins / ties / losses at p < 0.05.

    python -m greenlab.compare RUN_DIR RUN_DIR ... --out DIR [--reference RUN_DIR] [--names A B ...]
    python -m greenlab.compare --recompute RUN_DIR ... --out DIR   # every metric from predictions.csv

Each RUN_DIR is a training or ``greenlab.evaluate`` run with linear probes (results.json + bootstrap.npz). A
comparison is one binary task, or one class (one-vs-rest) or the macro mean of a multi-class task, on one
dataset. Runs are compared only on identical held-out sets (same ids, same labels, same order): otherwise
the comparison is refused, naming the first dataset that differs. Wins: model A beats B on a comparison
when p < alpha and A's median is higher; with ``--reference`` each model is tested against that run only,
else every pair. Writes comparison.md, comparison.csv (one row per comparison and model), pairwise.csv,
comparison.png into ``--out`` (a new folder, never an earlier one) and logs one W&B run (offline unless
``--wandb online``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from greenlab.analysis import recompute
from greenlab.analysis.study import SPENT
from greenlab.evaluation import label_efficiency
from greenlab.evaluation.statistics import wilcoxon_p
from greenlab.results.model import RESULTS_FILE, Results


@dataclass
class Run:
    """One run's scores: ``vectors`` {(dataset, task, comparison): bootstrap AUROCs}, ``rows`` the same keys
    -> its ``Comparison``, ``held_out`` {dataset: (ids, labels)}."""

    name: str
    path: Path
    vectors: dict
    rows: dict
    held_out: dict
    results: Results


def load_run(path: Path, name: str) -> Run:
    """A run folder's comparisons with bootstrap draws (``Results.from_folder``: any schema version); a clear
    error naming the file when there are none."""
    results = Results.from_folder(path)
    drawn = [c for c in results.comparisons if c.draws is not None]
    if not drawn:
        raise FileNotFoundError(
            f"{path / 'bootstrap.npz'}: no bootstrap draws; greenlab.compare needs a finished run with linear "
            "probes and evaluation.bootstrap_resamples > 0"
        )
    rows = {c.key: c for c in drawn}
    vectors = {c.key: c.draws.astype(np.float64) for c in drawn}
    held_out = {name: (h.ids, h.labels) for name, h in results.held_out.items()}
    return Run(name, path, vectors, rows, held_out, results)


def check_same_test_sets(runs: list[Run]) -> None:
    """Refuse runs whose held-out sets differ from the first run's, naming the first dataset that differs."""
    first = runs[0]
    for run in runs[1:]:
        for dataset in sorted(set(first.held_out) | set(run.held_out)):
            if dataset not in run.held_out or dataset not in first.held_out:
                where = run if dataset not in run.held_out else first
                raise ValueError(f"test sets differ: dataset {dataset!r} is not in {where.path}")
            (ids_a, labels_a), (ids_b, labels_b) = first.held_out[dataset], run.held_out[dataset]
            if len(ids_a) != len(ids_b) or not np.array_equal(ids_a, ids_b):
                raise ValueError(
                    f"test sets differ: dataset {dataset!r} has other held-out ids in {run.path} than in "
                    f"{first.path} ({len(ids_b)} vs {len(ids_a)} items{_first_difference(ids_a, ids_b)})"
                )
            if not np.array_equal(labels_a, labels_b):
                raise ValueError(
                    f"test sets differ: dataset {dataset!r} has other labels in {run.path} than in {first.path}"
                )


def compare(runs: list[Run], reference: str | None, alpha: float) -> dict:
    """{"comparisons": [(dataset, task, comparison)], "pairwise": [...], "record": {model: [wins, ties, losses]}}."""
    shared = sorted(set.intersection(*(set(r.vectors) & set(r.rows) for r in runs)))
    # a comparison with no AUROC in some run (its held-out set had one class) is listed, not compared
    keys = [k for k in shared if all(r.rows[k].auroc is not None for r in runs)]
    unscored = [k for k in shared if k not in keys]
    if not keys:
        raise ValueError("the runs share no scored comparison (dataset / task / class)"
                         + (f"; not scored (one class held out): {unscored}" if unscored else ""))  # fmt: skip
    pairs = (
        [(r_ref, r) for r_ref in runs if r_ref.name == reference for r in runs if r.name != reference]
        if reference
        else list(itertools.combinations(runs, 2))
    )
    record = {r.name: [0, 0, 0] for r in runs}
    pairwise = []
    for key in keys:
        for a, b in pairs:
            p = wilcoxon_p(a.vectors[key], b.vectors[key])
            median_a, median_b = a.rows[key].auroc, b.rows[key].auroc
            winner = None if not p < alpha or median_a == median_b else (a if median_a > median_b else b)
            for run in (a, b):
                record[run.name][1 if winner is None else 0 if winner is run else 2] += 1
            pairwise.append({"dataset": key[0], "task": key[1], "comparison": key[2], "model_a": a.name,
                             "model_b": b.name, "median_a": median_a, "median_b": median_b, "p": p,
                             "winner": winner.name if winner else "tie"})  # fmt: skip
    return {"comparisons": keys, "pairwise": pairwise, "record": record, "unscored": unscored}


def write_outputs(runs: list[Run], outcome: dict, out: Path, alpha: float) -> dict[str, Path]:
    """comparison.md / .csv / .png and pairwise.csv in ``out`` (created; it must not exist yet)."""
    out.mkdir(parents=True)
    files = {k: out / f for k, f in (("md", "comparison.md"), ("csv", "comparison.csv"),
                                      ("pairwise", "pairwise.csv"), ("png", "comparison.png"))}  # fmt: skip
    with files["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["dataset", "task", "comparison", "model", "auroc_median", "ci_low", "ci_high", "auroc_point"]
        )
        for key in outcome["comparisons"]:
            for run in runs:
                row = run.rows[key]
                low, high = row.auroc_ci95 or (math.nan, math.nan)
                writer.writerow([*key, run.name, row.auroc, low, high, row.auroc_point])
    with files["pairwise"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(outcome["pairwise"][0]))
        writer.writeheader()
        writer.writerows(outcome["pairwise"])
    files["md"].write_text(
        markdown(runs, outcome, alpha) + "".join(f"{line}\n" for line in efficiency_table(runs))
    )
    plot(runs, outcome["comparisons"], files["png"])
    if any(efficiency_of(run) for run in runs):
        files["label_efficiency"] = out / "label_efficiency.png"
        plot_efficiency(runs, files["label_efficiency"])
    return files


def efficiency_of(run: Run) -> dict:
    """{task: {point: record}} of a run's label-efficiency probes (evaluation.label_fractions), {} without."""
    return run.results.metrics.get("probe_label_efficiency") or {}


def efficiency_table(runs: list[Run]) -> list[str]:
    """Label efficiency side by side: per task and subset, each model's labels and AUROC [95 % CI]."""
    if not any(efficiency_of(run) for run in runs):
        return []
    lines = ["", "## Label efficiency (probe refitted on subsets of the training labels)", "",
             "| task | subset | " + " | ".join(r.name for r in runs) + " |", "|---|---|" + "---|" * len(runs)]  # fmt: skip
    keys = dict.fromkeys((t, p) for r in runs for t, points in efficiency_of(r).items() for p in points)
    for task, point in keys:
        cells = []
        for run in runs:
            r = efficiency_of(run).get(task, {}).get(point)
            low, high = (r or {}).get("auroc_ci95") or (math.nan, math.nan)
            cells.append(f"{r['auroc']:.3f} [{low:.3f}, {high:.3f}] ({r['labels']:.0f} labels)" if r else "")
        lines.append(f"| {task} | {point} | " + " | ".join(cells) + " |")
    return lines


def plot_efficiency(runs: list[Run], path: Path) -> None:
    """The runs' label-efficiency curves overlaid, one line per model and task."""
    curves = {f"{run.name}: {task}": points for run in runs for task, points in efficiency_of(run).items()}
    label_efficiency.plot(curves, path, "label efficiency")


def markdown(runs: list[Run], outcome: dict, alpha: float) -> str:
    names = [r.name for r in runs]
    lines = ["# Model comparison (linear probes, AUROC: bootstrap median [95% CI])", "",
             "| model | run |", "|---|---|", *(f"| {r.name} | `{r.path}` |" for r in runs), "",
             "| dataset | task | class | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for key in outcome["comparisons"]:
        best = max(r.rows[key].auroc for r in runs)
        cells = []
        for run in runs:
            row = run.rows[key]
            low, high = row.auroc_ci95 or (math.nan, math.nan)
            text = f"{row.auroc:.3f} [{low:.3f}, {high:.3f}]"
            cells.append(f"**{text}**" if row.auroc == best else text)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    lines += ["", f"Wilcoxon signed-rank tests on the paired bootstrap vectors, p < {alpha} "
              f"({len(outcome['pairwise'])} tests over {len(outcome['comparisons'])} comparisons):", "",
              "| model | wins | ties | losses |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {n} | {w} | {t} | {lo} |" for n, (w, t, lo) in outcome["record"].items()]
    if outcome.get("unscored"):
        lines += ["", "Not compared (no AUROC in some run: its held-out set had one class): "
                  + ", ".join("/".join(k) for k in outcome["unscored"])]  # fmt: skip
    return "\n".join([*lines, *spent_table(runs)]) + "\n"


def spent_table(runs: list[Run]) -> list[str]:
    """What each model's pre-training cost (training runs; "evaluation only" for ``greenlab.evaluate`` runs):
    FLOPs per training image / volume, images seen, device-hours, kWh, CO2e (the whole run, evaluation included;
    blank where a run's results.json has no such record)."""
    columns = [("FLOPs / image", lambda r: r.compute["train_flops_per_image"], "{:.2e}"),
               ("images seen", lambda r: r.compute["train_images_seen"], "{:,}"), *SPENT]  # fmt: skip
    lines = ["", "What each model cost (its whole run; FLOPs counted per training image or volume):", "",
             "| model | experiment | init | " + " | ".join(n for n, _, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for run in runs:
        r = run.results
        trained = r.scale != "evaluation only"
        cells = [run.name, r.experiment if trained else "evaluation only", (r.init or {}).get("used", "")]
        for _, value, fmt in columns:
            try:
                cells.append(fmt.format(value(r)))
            except (KeyError, TypeError, ValueError):  # not recorded (an evaluation-only or older run)
                cells.append("")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def plot(runs: list[Run], keys: list, path: Path) -> None:
    """Models x comparisons: median AUROC with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(keys) * len(runs) ** 0.5 + 3), 4))
    width = 0.8 / len(runs)
    for m, run in enumerate(runs):
        x = np.arange(len(keys)) + (m - (len(runs) - 1) / 2) * width
        medians = np.array([run.rows[k].auroc for k in keys])
        ci = np.array([run.rows[k].auroc_ci95 or (math.nan, math.nan) for k in keys], dtype=float)
        ax.errorbar(
            x, medians, yerr=[medians - ci[:, 0], ci[:, 1] - medians], fmt="o", capsize=3, label=run.name
        )
    ax.set_xticks(np.arange(len(keys)), ["/".join(k[1:]) if len({k[0] for k in keys}) == 1 else "/".join(k) for k in keys],
                  rotation=45, ha="right")  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_ylabel("AUROC (bootstrap median, 95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_wandb(runs: list[Run], outcome: dict, files: dict, out: Path, mode: str) -> None:
    """One W&B run (job_type compare): the tables and the plot."""
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project="greenlab", job_type="compare", dir=str(out), mode=mode,
                     config={"runs": {r.name: str(r.path) for r in runs}})  # fmt: skip
    with files["csv"].open() as handle:
        rows = list(csv.reader(handle))
    run.log({"comparison": wandb.Table(columns=rows[0], data=rows[1:]),
             "record": wandb.Table(columns=["model", "wins", "ties", "losses"],
                                   data=[[n, *v] for n, v in outcome["record"].items()]),
             "plot": wandb.Image(str(files["png"]))})  # fmt: skip
    run.finish()


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"; first difference at position {i}: {str(x)!r} vs {str(y)!r}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m greenlab.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (results.json + bootstrap.npz)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the tables and the plot")
    parser.add_argument(
        "--reference", type=Path, help="compare every run with this one only (it is added if absent)"
    )
    parser.add_argument("--names", nargs="+", help="model names, one per run (default: experiment:folder)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of a win (paper: 0.05)")
    parser.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute every metric of each run from its predictions.csv (recomputed.csv in --out)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} already exists: greenlab.compare never overwrites an earlier comparison")
    if args.recompute:
        return recompute_runs(args.runs, args.out)
    paths = list(dict.fromkeys([*([args.reference] if args.reference else []), *args.runs]))
    if len(paths) < 2:
        parser.error("give at least two runs")
    if args.names and len(args.names) != len(paths):
        parser.error(f"--names: {len(args.names)} names for {len(paths)} runs")
    names = args.names or [_default_name(p) for p in paths]
    if len(set(names)) != len(names):
        parser.error(f"model names must differ: {names} (use --names)")
    try:
        runs = [load_run(p, n) for p, n in zip(paths, names)]
        check_same_test_sets(runs)
        outcome = compare(runs, runs[0].name if args.reference else None, args.alpha)
    except (FileNotFoundError, ValueError) as err:
        print(f"greenlab.compare: {err}", file=sys.stderr)
        return 2
    files = write_outputs(runs, outcome, args.out, args.alpha)
    log_wandb(runs, outcome, files, args.out, args.wandb)
    print(files["md"].read_text())
    print(f"greenlab.compare: {', '.join(str(f) for f in files.values())}")
    return 0


def recompute_runs(paths: list[Path], out: Path) -> int:
    """``--recompute``: recomputed.csv (greenlab/analysis/recompute.py) in ``out``, printed."""
    try:
        rows = [row for path in paths for row in recompute.recompute(path)]
    except (FileNotFoundError, ValueError) as err:
        print(f"greenlab.compare: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True)
    recompute.write(rows, out / "recomputed.csv")
    print((out / "recomputed.csv").read_text())
    return 0


def _default_name(path: Path) -> str:
    experiment = Results.from_folder(path).experiment if (path / RESULTS_FILE).is_file() else "run"
    return f"{experiment}:{path.name}"
