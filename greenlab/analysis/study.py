"""Collect a sweep's results.json files into a table (Markdown + CSV) and plots.

    python -m greenlab.study <sweep_dir> --out experiments/<name> [--vary objective.noise_std ...]
    python -m greenlab.study <sweep_dir> --out experiments/efficiency --efficiency [--price-per-device-hour 2.5]

Each run directory under ``sweep_dir`` holding a results.json becomes one row. Ablation (default): the
varied config values, probe AUROC (macro and per task, before and after pre-training), training FLOPs,
throughput, device-hours, kWh, CO2e, embedding size; plots: probe AUROC vs energy, per-task AUROC per run.
``--efficiency``: one row per method (the runs may be different experiments): parameters, training FLOPs
per image, throughput, device-hours, kWh, CO2e, cost at a price per device-hour, embedding dim / bytes /
throughput, probe AUROC; plots: AUROC vs energy, and the cost bars; logged to W&B with ``--wandb``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from greenlab.results.model import RESULTS_FILE, Results  # noqa: E402

# what a run spent, in both tables: (name, value from the results, format)
SPENT = [
    ("device-h", lambda r: r.compute["device_hours"], "{:.4f}"),
    ("kWh", lambda r: r.energy["kwh"], "{:.5f}"),
    ("CO2e g", lambda r: r.energy["co2e_kg"] * 1000, "{:.2f}"),
]
COLUMNS = [
    ("probe AUROC", lambda r: r.metrics.get("probe_auroc_macro"), "{:.3f}"),
    ("AUROC before", lambda r: r.metrics.get("initial_backbone", {}).get("probe_auroc_macro"), "{:.3f}"),
    ("train FLOPs", lambda r: r.compute["train_flops"], "{:.2e}"),
    ("FLOPs/img", lambda r: r.compute.get("train_flops_per_image"), "{:.2e}"),
    ("img/s", lambda r: r.compute["train_throughput_img_s"], "{:.1f}"),
    *SPENT,
    ("emb dim", lambda r: _embedding(r, "dim"), "{}"),
]


def load_runs(sweep_dir: Path) -> list[tuple[Path, Results]]:
    """Every run folder under ``sweep_dir`` (``Results.from_folder``: any schema version)."""
    found = [
        p for p in sweep_dir.rglob(RESULTS_FILE) if "wandb" not in p.relative_to(sweep_dir).parts
    ]  # not W&B's copies
    order = sorted(found, key=lambda p: [int(part) if part.isdigit() else part for part in p.parent.parts])
    runs = [(p.parent, Results.from_folder(p.parent)) for p in order]
    if not runs:
        raise FileNotFoundError(f"no results.json under {sweep_dir}")
    return runs


def _embedding(results: Results, name: str):
    """A field of the run's embedding, None when it computed none."""
    return getattr(results.embedding, name) if results.embedding else None


def _objective(results: Results) -> str:
    """The objective's class name (``TokenReconstruction``, ``SparKPretraining``, ...)."""
    return str(config_value(results, "objective._target_")).rsplit(".", 1)[-1]


def config_value(results: Results, dotted: str):
    value = results.config
    for part in dotted.split("."):
        value = value[part]
    return f"{value:.3g}" if isinstance(value, float) else value


def _cells(results: Results, columns) -> list[str]:
    cells = []
    for _, get, fmt in columns:
        value = get(results)
        cells.append("n/a" if value is None else fmt.format(value))
    return cells


def _write_tables(out: Path, header: list[str], rows: list[list[str]], caption: list[str]) -> None:
    with (out / "table.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    md = [*caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    (out / "table.md").write_text("\n".join(md) + "\n")


def write_study(sweep_dir: Path, out: Path, vary: list[str]) -> list[Path]:
    """Write table.md, table.csv, auroc_vs_energy.png and auroc_per_task.png into ``out``."""
    runs = load_runs(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", "objective", *vary, *(name for name, _, _ in COLUMNS)]
    rows = [
        [d.name, _objective(r), *(config_value(r, v) for v in vary), *_cells(r, COLUMNS)] for d, r in runs
    ]
    first = runs[0][1]
    _write_tables(out, header, rows, [
        f"Sweep `{sweep_dir}`: {len(runs)} runs of `{first.experiment}` (scale {first.scale}, "
        f"init {first.init.get('used')}, data {first.data.get('name')}, device {first.compute['device']}).",
    ])  # fmt: skip

    labels = [" ".join(f"{v.split('.')[-1]}={config_value(r, v)}" for v in vary) or d.name for d, r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (_, r) in zip(labels, runs):
        ax.scatter(r.energy["kwh"] * 1000, r.metrics.get("probe_auroc_macro", float("nan")), label=label)
    ax.set_xlabel("energy, whole run (Wh)")
    ax.set_ylabel("probe AUROC (macro)")
    ax.set_title(f"{first.experiment}: AUROC vs energy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "auroc_vs_energy.png", dpi=120)
    plt.close(fig)

    tasks = list(first.metrics.get("probe_tasks", {}))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(runs))
    for i, (label, (_, r)) in enumerate(zip(labels, runs)):
        values = [r.metrics["probe_tasks"][t].get("auroc", float("nan")) for t in tasks]
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


def efficiency_columns(price_per_device_hour: float) -> list:
    """The efficiency table's columns: (name, value from a results dict, format)."""
    return [
        ("params", lambda r: r.compute["params"], "{:,}"),
        ("images seen", lambda r: r.compute["train_images_seen"], "{:,}"),
        ("train FLOPs / img", lambda r: r.compute.get("train_flops_per_image"), "{:.2e}"),
        ("train img/s", lambda r: r.compute["train_throughput_img_s"], "{:.1f}"),
        *SPENT,
        ("cost $", lambda r: r.compute["device_hours"] * price_per_device_hour, "{:.4f}"),
        ("emb dim", lambda r: _embedding(r, "dim"), "{}"),
        ("emb bytes", lambda r: _embedding(r, "bytes_per_image"), "{}"),
        ("emb img/s", lambda r: _embedding(r, "throughput_img_s"), "{:.1f}"),
        ("probe AUROC", lambda r: r.metrics.get("probe_auroc_macro"), "{:.3f}"),
    ]


def write_efficiency(sweep_dir: Path, out: Path, price_per_device_hour: float) -> list[Path]:
    """The efficiency comparison: table.md, table.csv, auroc_vs_energy.png, cost.png in ``out``."""
    runs = load_runs(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = efficiency_columns(price_per_device_hour)
    header = ["method", "objective", "data", "init", "device", *(name for name, _, _ in columns)]
    rows = [
        [run_dir.name, r.config["objective"]["_target_"].rsplit(".", 1)[-1], r.data.get("name"),
         _init_used(r.init), r.compute["device"], *_cells(r, columns)]
        for run_dir, r in runs
    ]  # fmt: skip
    _write_tables(out, header, rows, [
        f"Efficiency study `{sweep_dir}`: {len(runs)} methods; cost at ${price_per_device_hour:g} per "
        "device-hour; kWh and CO2e for the whole run (training + evaluation), as each results.json says.",
    ])  # fmt: skip

    fig, ax = plt.subplots(figsize=(6, 4))
    for run_dir, r in runs:
        x, y = r.energy["kwh"] * 1000, r.metrics.get("probe_auroc_macro", float("nan"))
        ax.scatter(x, y)
        ax.annotate(run_dir.name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("energy, whole run (Wh, log scale)")
    ax.set_ylabel("probe AUROC (macro, held-out)")
    ax.set_title("Downstream AUROC vs energy")
    fig.tight_layout()
    fig.savefig(out / "auroc_vs_energy.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
    names = [d.name for d, _ in runs]
    quantities = [
        ("train FLOPs per image", [r.compute.get("train_flops_per_image") or 0 for _, r in runs]),
        ("device-hours", [r.compute["device_hours"] for _, r in runs]),
        ("embedding bytes per image", [_embedding(r, "bytes_per_image") or 0 for _, r in runs]),
    ]
    for ax, (title, values) in zip(axes, quantities):
        ax.bar(names, values)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)
    plt.close(fig)
    return [out / n for n in ("table.md", "table.csv", "auroc_vs_energy.png", "cost.png")]


def _init_used(init: dict) -> str:
    if "used" in init:
        return init["used"]
    return ", ".join(f"{part} {value.get('used')}" for part, value in init.items() if isinstance(value, dict))


def log_to_wandb(out: Path, files: list[Path], name: str, directory: Path) -> None:
    """The table and the plots as one W&B run (offline unless WANDB_MODE says otherwise), its local files
    under ``directory``."""
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "greenlab"), group=name, name=name,
                     job_type="study", dir=str(directory))  # fmt: skip
    with (out / "table.csv").open() as handle:
        header, *rows = list(csv.reader(handle))
    run.log({"table": wandb.Table(columns=header, data=rows)})
    run.log({f.stem: wandb.Image(str(f)) for f in files if f.suffix == ".png"})
    run.finish()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vary", nargs="*", default=[], help="dotted config keys to show as columns")
    parser.add_argument("--efficiency", action="store_true", help="the efficiency comparison across methods")
    parser.add_argument("--price-per-device-hour", type=float, default=2.5, help="USD, for the cost column")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    args = parser.parse_args()
    if args.efficiency:
        files = write_efficiency(args.sweep_dir, args.out, args.price_per_device_hour)
    else:
        files = write_study(args.sweep_dir, args.out, args.vary)
    if args.wandb:
        log_to_wandb(args.out, files, args.out.name, args.sweep_dir)
    for path in files:
        print(path)
