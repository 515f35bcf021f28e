"""results.json and the readable results.md beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_results(results: dict, output_dir: Path) -> tuple[Path, Path]:
    """Write results.json + results.md into ``output_dir``; refuses to replace an existing results.json."""
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    if json_path.exists():
        raise FileExistsError(
            f"{json_path} already exists: greenlab never overwrites an earlier run's results"
        )
    json_path.write_text(json.dumps(_finite(results), indent=2, default=str))
    md_path.write_text(markdown(results))
    return json_path, md_path


def markdown(results: dict) -> str:
    m, c, e, emb, init = (
        results["metrics"],
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
    ]
    if "probe_tasks" in m:
        lines += _probe_section(m)
    if "zero_shot_auroc_macro" in m:
        lines += _zero_shot_section(m)
    if "finetune_folds" in m:
        lines += _finetune_section(m)
    lines += [
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


def _initialisation(init: dict) -> str:
    """``{used, source, note}``, or one such record per part (``{"image": {...}, "text": {...}}``)."""
    if "used" not in init:
        return "; ".join(f"{part} {_initialisation(record)}" for part, record in init.items())
    return (
        f"**{init.get('used')}**"
        + (f" from {init['source']}" if init.get("source") else "")
        + (f" — {init['note']}" if init.get("note") else "")
    )


def _zero_shot_section(m: dict) -> list[str]:
    ci = m.get("zero_shot_auroc_macro_ci95") or [math.nan, math.nan]
    probes, pool = m.get("probe_tasks", {}), m["retrieval_pool_size"]
    lines = [
        "",
        "## Zero-shot diagnosis (held-out split, prompts only)",
        "",
        "| finding | zero-shot AUROC | linear probe AUROC (supervised reference) |",
        "|---|---|---|",
    ]
    for key, value in m.items():
        if key.startswith("zero_shot_auroc/"):
            name = key.split("/", 1)[1]
            lines.append(f"| {name} | {value:.3f} | {probes.get(name, {}).get('auroc', math.nan):.3f} |")
    lines += [
        f"| **macro** | **{m['zero_shot_auroc_macro']:.3f}** [95% CI {ci[0]:.3f}, {ci[1]:.3f}] | "
        f"{m.get('probe_auroc_macro', math.nan):.3f} |",
        "",
        f"Report-to-volume retrieval over {pool} held-out studies: "
        + ", ".join(f"Recall@{k} {m[f'report_to_volume_recall@{k}']:.3f}" for k in (1, 5, 10))
        + " (chance "
        + ", ".join(f"{min(k, pool) / pool:.3f}" for k in (1, 5, 10))
        + ").",
    ]
    return lines


def _probe_section(m: dict) -> list[str]:
    lines = [
        "",
        "## Linear probes (held-out split)",
        "",
        "| task | classes | n train | n test | AUROC | bootstrap median [95% CI] | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, task in m["probe_tasks"].items():
        if "skipped" in task:
            lines.append(f"| {name} | | {task.get('n_train', '')} | | skipped: {task['skipped']} | | |")
            continue
        ci = task.get("auroc_ci95") or [math.nan, math.nan]
        lines.append(
            f"| {name} | {task['num_classes']} | {task['n_train']} | {task['n_test']} | {task['auroc']:.3f} | "
            f"{task.get('auroc_bootstrap_median', math.nan):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {task['accuracy']:.3f} |"
        )
    lines.append(
        f"| **macro** | | | | **{m['probe_auroc_macro']:.3f}** | {m['probe_auroc_bootstrap_median_macro']:.3f} | "
        f"{m['probe_accuracy_macro']:.3f} |"
    )
    initial = m.get("initial_backbone")
    if initial and "probe_auroc_macro" in initial:
        per_task = ", ".join(
            f"{k} {v['auroc']:.3f}" for k, v in initial["probe_tasks"].items() if "auroc" in v
        )
        lines += [
            "",
            f"Same probes on the backbone **before** pre-training: macro AUROC {initial['probe_auroc_macro']:.3f} ({per_task}).",
        ]
    return lines


def _finetune_section(m: dict) -> list[str]:
    initial = m.get("initial_backbone") or {}
    folds = len(m["finetune_folds"])
    lines = [
        "",
        f"## Fine-tuning, stratified {folds}-fold cross-validation (task `{m['finetune_task']}`)",
        "",
        "| metric | pre-trained (mean ± std) | same protocol before pre-training | difference |",
        "|---|---|---|---|",
    ]
    for name in ("accuracy", "auroc", "kappa", "f1_weighted"):
        mean, std = m[f"finetune_{name}_mean"], m[f"finetune_{name}_std"]
        row = f"| {name} | {mean:.3f} ± {std:.3f} |"
        if f"finetune_{name}_mean" in initial:
            base, base_std = initial[f"finetune_{name}_mean"], initial[f"finetune_{name}_std"]
            row += f" {base:.3f} ± {base_std:.3f} | {mean - base:+.3f} |"
        else:
            row += " | |"
        lines.append(row)
    return lines


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
