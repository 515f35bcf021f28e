"""results.json and the readable results.md beside it: the parts every run has (header, compute, energy,
embedding); the evaluation writes its own section (``Evaluation.markdown``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from greenlab import recipe


def write_results(
    results: dict, output_dir: Path, evaluation_section: list[str], arrays: dict | None = None
) -> tuple[Path, Path]:
    """Write results.json + results.md (``evaluation_section``: the evaluation's own lines) and, when the
    evaluation resampled, bootstrap.npz (``arrays``) into ``output_dir``; never replaces any of them."""
    json_path, md_path, npz_path = (output_dir / n for n in ("results.json", "results.md", "bootstrap.npz"))
    for path in (json_path, npz_path):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists: greenlab never overwrites an earlier run's results"
            )
    if arrays:
        np.savez_compressed(npz_path, **arrays)
    json_path.write_text(json.dumps(_finite(results), indent=2, default=str))
    md_path.write_text(markdown(results, evaluation_section))
    return json_path, md_path


def markdown(results: dict, evaluation_section: list[str]) -> str:
    """The common parts (header, compute, energy, embedding) around the evaluation's section."""
    c, e, emb, init = (
        results["compute"],
        results["energy"],
        results["embedding"],
        results["init"],
    )
    lines = [
        f"# {results['experiment']}: results",
        "",
        f"- run directory: `{results['run_dir']}`",
        f"- scale: **{results.get('scale', '?')}**"
        + (" (reduced demo budget, not the paper's schedule)" if results.get("scale") == "demo" else ""),
        f"- data: {results['data'].get('name')} ({results['data'].get('pretrain_images')} pre-training images)",
        "- initialisation: " + _initialisation(init),
        *recipe.markdown(results["recipe"]),
    ]
    lines += evaluation_section
    lines += (
        _compute(c, e)
        if "train_flops" in c
        else [
            "",
            "## Compute and energy (evaluation only)",
            "",
            f"No pre-training: {results.get('pretraining')}.",
            "",
            f"- parameters (backbone): {c['params']:,}",
            f"- energy, evaluation: {e['kwh']:.6f} kWh; CO2e {e['co2e_kg'] * 1000:.3f} g "
            f"(x {e['carbon_intensity_kg_per_kwh']} kg/kWh, PUE {e['pue']}); {e['method']}",
        ]
    )
    lines += [
        "",
        "## Embeddings",
        "",
    ]
    if emb:
        lines += [
            f"- {emb['dim']}-d {emb['dtype']} ({emb['bytes_per_image']} bytes per image), pooling `{emb['pooling']}`",
            f"- throughput {emb['throughput_img_s']:.1f} img/s ({emb['throughput_method']})",
        ]
    else:
        lines.append("- not computed (no labelled data)")
    return "\n".join(lines) + "\n"


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


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
