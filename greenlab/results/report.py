"""results.md, the readable report beside results.json: rendered from the typed ``Results``, with the parts
every run has (header, recipe, the comparisons table, compute, energy, embedding) around the sections the
evaluation adds (``Evaluation.markdown``)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from greenlab.results import recipe
from greenlab.results.model import Results

REPORT_FILE = "results.md"


def write_markdown(results: Results, evaluation_sections: list[str], output_dir: Path) -> Path:
    """results.md in ``output_dir`` (``evaluation_sections``: the evaluation's own lines); never replaces it."""
    path = output_dir / REPORT_FILE
    if path.exists():
        raise FileExistsError(f"{path} already exists: greenlab never overwrites an earlier run's results")
    path.write_text(markdown(results, evaluation_sections))
    return path


def markdown(results: Results, evaluation_sections: list[str]) -> str:
    """The common parts around the evaluation's sections."""
    c, e, emb = results.compute, results.energy, results.embedding
    lines = [
        f"# {results.experiment}: results",
        "",
        f"- run directory: `{results.run_dir}`",
        f"- scale: **{results.scale}**"
        + (" (reduced demo budget, not the paper's schedule)" if results.scale == "demo" else ""),
        f"- data: {results.data.get('name')} ({results.data.get('pretrain_images')} pre-training images)",
        "- initialisation: " + _initialisation(results.init),
        *recipe.markdown(results.recipe),
    ]
    lines += comparisons_table(results)
    lines += evaluation_sections
    lines += (
        _compute(c, e)
        if results.pretraining is None
        else [
            "",
            "## Compute and energy (evaluation only)",
            "",
            f"No pre-training: {results.pretraining}.",
            "",
            f"- parameters (backbone): {c['params']:,}",
            f"- energy, evaluation: {e['kwh']:.6f} kWh; CO2e {e['co2e_kg'] * 1000:.3f} g "
            f"(x {e['carbon_intensity_kg_per_kwh']} kg/kWh, PUE {e['pue']}); {e['method']}",
        ]
    )
    lines += ["", "## Embeddings", ""]
    if emb:
        lines += [
            f"- {emb.dim}-d {emb.dtype} ({emb.bytes_per_image} bytes per image), pooling `{emb.pooling}`",
            f"- throughput {emb.throughput_img_s:.1f} img/s ({emb.throughput_method})",
        ]
    else:
        lines.append("- not computed (no labelled data)")
    return "\n".join(lines) + "\n"


def comparisons_table(results: Results) -> list[str]:
    """Every scored comparison, one row each: AUROC (headline [95 % CI]), point estimate, AUPRC."""
    if not results.comparisons:
        return []
    lines = ["", "## Held-out AUROC", "", "| evaluation | dataset | task | class | n test | AUROC [95% CI] | point | AUPRC |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    per_task = Counter((row.evaluation, row.dataset, row.task) for row in results.comparisons)
    for row in results.comparisons:
        low, high = row.auroc_ci95 or (math.nan, math.nan)
        label = (
            "" if per_task[row.evaluation, row.dataset, row.task] == 1 else row.comparison
        )  # binary: no class
        lines.append(f"| {row.evaluation} | {row.dataset} | {row.task} | {label} | {_number(row.n_test, '{}')} | "
                     f"{_number(row.auroc)}{f' [{_number(low)}, {_number(high)}]' if _number(low) else ''} | "
                     f"{_number(row.auroc_point)} | "
                     f"{_number(row.auprc)} |")  # fmt: skip
    return lines


def _number(value, fmt: str = "{:.3f}") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _compute(c: dict, e: dict) -> list[str]:
    """The pre-training compute and energy table."""
    return [
        "",
        "## Compute and energy (pre-training)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| parameters (backbone) | {c['params']:,} |",
        f"| training FLOPs | {c['train_flops']:.3e} ({(c.get('train_flops_per_image') or 0):.3e} per image) |",
        f"| images seen | {c['train_images_seen']:,} |",
        f"| training throughput | {c['train_throughput_img_s'] or 0:.2f} img/s |",
        f"| wall time | {c['train_seconds']:.1f} s |",
        f"| device-hours | {c['device_hours']:.5f} ({c['devices']} x {c['device']}, {c['precision']}) |",
        f"| peak memory | {c['peak_memory_bytes'] / 2**20:.0f} MiB ({c['peak_memory_method']}) |",
        f"| energy, training | {e['train_kwh']:.6f} kWh |",
        f"| energy, whole run | {e['kwh']:.6f} kWh |",
        f"| CO2e, whole run | {e['co2e_kg'] * 1000:.3f} g (x {e['carbon_intensity_kg_per_kwh']} kg/kWh, PUE {e['pue']}) |",
        f"| energy method | {e['method']} |",
    ]


def _initialisation(init: dict) -> str:
    """``{used, source, note}``, or one such record per part (``{"image": {...}, "text": {...}}``)."""
    if "used" not in init:
        return "; ".join(f"{part} {_initialisation(record)}" for part, record in init.items())
    return (
        f"**{init.get('used')}**"
        + (f" from {init['source']}" if init.get("source") else "")
        + (f" — {init['note']}" if init.get("note") else "")
    )
