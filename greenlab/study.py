"""Collect a sweep's results.json files into a table (Markdown + CSV) and plots.

    python -m greenlab.study <sweep_dir> --out experiments/<name> [--vary objective.noise_std ...]

Each run directory under ``sweep_dir`` holding a results.json becomes one row: the varied config values,
probe AUROC (macro and per task, before and after pre-training), training FLOPs, throughput, device-hours,
kWh, CO2e, embedding size. Plots: probe AUROC vs energy, and per-task AUROC per run.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = [
    ("probe AUROC", lambda r: r["metrics"].get("probe_auroc_macro"), "{:.3f}"),
    ("AUROC before", lambda r: r["metrics"].get("initial_backbone", {}).get("probe_auroc_macro"), "{:.3f}"),
    ("train FLOPs", lambda r: r["compute"]["train_flops"], "{:.2e}"),
    ("img/s", lambda r: r["compute"]["train_throughput_img_s"], "{:.1f}"),
    ("device-h", lambda r: r["compute"]["device_hours"], "{:.4f}"),
    ("kWh", lambda r: r["energy"]["kwh"], "{:.5f}"),
    ("CO2e g", lambda r: r["energy"]["co2e_kg"] * 1000, "{:.2f}"),
    ("emb dim", lambda r: r["embedding"].get("dim"), "{}"),
]


def load_runs(sweep_dir: Path) -> list[tuple[Path, dict]]:
    runs = [(p.parent, json.loads(p.read_text())) for p in sorted(sweep_dir.rglob("results.json"))]
    if not runs:
        raise FileNotFoundError(f"no results.json under {sweep_dir}")
    return runs


def config_value(results: dict, dotted: str):
    value = results["config"]
    for part in dotted.split("."):
        value = value[part]
    return f"{value:.3g}" if isinstance(value, float) else value


def write_study(sweep_dir: Path, out: Path, vary: list[str]) -> list[Path]:
    """Write table.md, table.csv, auroc_vs_energy.png and auroc_per_task.png into ``out``."""
    runs = load_runs(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", *vary, *(name for name, _, _ in COLUMNS)]
    rows = []
    for run_dir, results in runs:
        cells = [run_dir.name, *(config_value(results, v) for v in vary)]
        for _, get, fmt in COLUMNS:
            value = get(results)
            cells.append("n/a" if value is None else fmt.format(value))
        rows.append(cells)
    with (out / "table.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    first = runs[0][1]
    md = [
        f"Sweep `{sweep_dir}`: {len(runs)} runs of `{first['experiment']}` (scale {first.get('scale')}, "
        f"init {first['init'].get('used')}, data {first['data'].get('name')}, device {first['compute']['device']}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]
    (out / "table.md").write_text("\n".join(md) + "\n")

    labels = [" ".join(f"{v.split('.')[-1]}={config_value(r, v)}" for v in vary) or d.name for d, r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (_, r) in zip(labels, runs):
        ax.scatter(
            r["energy"]["kwh"] * 1000, r["metrics"].get("probe_auroc_macro", float("nan")), label=label
        )
    ax.set_xlabel("energy, whole run (Wh)")
    ax.set_ylabel("probe AUROC (macro)")
    ax.set_title(f"{first['experiment']}: AUROC vs energy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "auroc_vs_energy.png", dpi=120)
    plt.close(fig)

    tasks = list(first["metrics"].get("probe_tasks", {}))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(runs))
    for i, (label, (_, r)) in enumerate(zip(labels, runs)):
        values = [r["metrics"]["probe_tasks"][t].get("auroc", float("nan")) for t in tasks]
        ax.bar([k + i * width for k in range(len(tasks))], values, width, label=label)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks)
    ax.set_ylabel("probe AUROC")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "auroc_per_task.png", dpi=120)
    plt.close(fig)
    return [out / n for n in ("table.md", "table.csv", "auroc_vs_energy.png", "auroc_per_task.png")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vary", nargs="*", default=[], help="dotted config keys to show as columns")
    args = parser.parse_args()
    for path in write_study(args.sweep_dir, args.out, args.vary):
        print(path)


if __name__ == "__main__":
    main()
