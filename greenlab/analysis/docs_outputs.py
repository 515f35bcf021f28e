"""The results.json reference of docs/outputs.md, generated from the results model
(``greenlab/results/model.py``): every key ``Results.to_json`` writes, with its type and default from the
dataclass, and the fields of the nested records (``Recipe``, ``Deviation``, ``Comparison``, ``Embedding``,
``Phase``). A key without a description here, or a description of a key the model no longer writes, is an
error, and ``tests/test_docs.py`` compares the page with this output, so the page cannot go stale.

``python -m greenlab.analysis.docs_outputs`` prints the part between the page's markers; ``--write`` puts it
there."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from greenlab.analysis import generated
from greenlab.results import model

PAGE = Path(__file__).resolve().parents[2] / "docs" / "outputs.md"
MARKERS = ("<!-- outputs:start (python -m greenlab.analysis.docs_outputs) -->", "<!-- outputs:end -->")

DESCRIPTIONS = {  # results.json's keys, in the order written
    "experiment": "the experiment's `name` (`retfound_green`, `sparse_cnn_mae`, `evaluate`, ...)",
    "scale": "`demo`, `paper`, ... (`greenlab/conf/scale/`): the budget the run used",
    "created": "when the run finished (ISO 8601)",
    "greenlab_version": "the installed greenlab version",
    "run_dir": "the run folder",
    "recipe": "the run against its experiment at `scale=paper`: `faithful`, `deviations` (every key where the "
    "run differs, with both values and why: the scale, an override, or weights that could not be had; hardware, "
    "paths, logging, the data source, `compile` / `channels_last` and `resume` are not the method); see Recipe",
    "init": "the backbone's initialisation as used: `requested`, `used` (`random` when no weights were found "
    "offline), `source`, `note` (keys left out of a checkpoint)",
    "data": "the data source: `name`, `split` (method and group counts), `label_schema` (per task: type, classes, "
    "counts, missing), what a volume option reports (`unlabelled_findings`, ...)",
    "optimized_metric": "the metric a sweeper optimises (the evaluation's headline by default, or "
    "`optimized_metric=<any number in metrics>`)",
    "metrics": "the evaluation's numbers: headlines (`probe_auroc_macro`: the mean over tasks of the "
    "bootstrap-median AUROC; `probe_auroc_point_macro`; `finetune_auroc_mean`; `zero_shot_auroc_macro`), per "
    "task and per class: median, 95 % CI, point estimate, AUPRC, accuracy, balanced accuracy; `calibration` "
    "(ECE, Brier); `initial_backbone` (the same before pre-training); label efficiency, subgroups, kNN",
    "comparisons": "one row per scored task / class (see Comparison); their bootstrap draws are in bootstrap.npz "
    "(`draws/<i>` = `comparisons[i]`)",
    "embedding": "the frozen embedding the evaluation used (see Embedding); null when none was computed",
    "compute": "the whole run's cost: `params`, `train_flops` (counted), `device_hours`, `peak_memory_bytes`, "
    "`train_throughput_img_s`, `effective_batch_size`, `compile`, `channels_last`, `fused_optimizer`, ...",
    "energy": "`kwh`, `co2e_kg`, `method` (NVML, RAPL, codecarbon or the CPU-seconds estimate), "
    "`carbon_intensity_source`",
    "phases": "the same cost by phase, `pretrain` and `evaluate` (see Phase)",
    "objective": "the objective's run notes (`run_notes()`: run-time choices such as SparK's sparse backend and "
    "why); null for `greenlab.evaluate`",
    "artifacts": "the files the run exported (backbone.pth, backbone.json, backbone_hf/, ...)",
    "config": "the whole resolved Hydra config",
    "pretraining": "null for a trained run; else why nothing was trained (`greenlab.evaluate`)",
    "preprocessing": "input size and normalisation given to the data by a backbone config (`greenlab.evaluate`)",
    "schema_version": f"{model.SCHEMA_VERSION} (files without it are version 1; `Results.from_folder` reads both)",
    "held_out_sets": "the names of the held-out sets, in the order of bootstrap.npz's `held_out/<j>/ids` and "
    "`/labels`",
}
NESTED = (model.Recipe, model.Deviation, model.Comparison, model.Embedding, model.Phase)
NESTED_DESCRIPTIONS = {
    "Recipe": {
        "experiment": "the experiment whose paper recipe the run is compared with",
        "faithful": "true when nothing differs; null when there is no recipe to compare (`note` says why)",
        "deviations": "one Deviation per differing key",
        "note": "why there is nothing to compare, or null",
    },
    "Deviation": {
        "key": "the config key",
        "paper": "the value at `scale=paper`",
        "used": "the value the run used",
        "why": "the scale, an override, or weights that could not be had",
    },
    "Comparison": {
        "evaluation": "`linear_probe`, `zero_shot`, `finetune`, `knn_probe`, ...",
        "dataset": "the held-out dataset's name (a MedMNIST file's stem, a folder's name)",
        "task": "the task (a labels column, a finding)",
        "comparison": "`macro` (a binary task, or the mean over a multi-class task's classes) or the class",
        "auroc": "the headline: the bootstrap median, else the point estimate",
        "auroc_ci95": "the 95 % interval of the `ci_resamples` resamples",
        "auroc_point": "AUROC on the held-out set itself",
        "auprc": "area under the precision-recall curve",
        "n_test": "held-out cases scored",
    },
    "Embedding": {
        "dim": "floats per image",
        "dtype": "their type (`float32`)",
        "bytes_per_image": "storage per image",
        "pooling": "how the tokens / feature map become one vector",
        "throughput_img_s": "images per second through the backbone forward alone",
        "throughput_method": "how that was timed",
    },
    "Phase": {
        "seconds": "wall seconds",
        "kwh": "energy",
        "co2e_kg": "kg CO2e (kWh x PUE x carbon intensity)",
        "energy_method": "how the energy was measured",
    },
}


def json_keys() -> list[str]:
    """The keys results.json has, in order: ``Results.to_json`` of an empty run."""
    empty = {f.name: None for f in dataclasses.fields(model.Results) if _required(f)}
    results = model.Results(**{**empty, "recipe": model.Recipe(None, None), "comparisons": [], "phases": {}})
    return list(results.to_json())


def markdown() -> str:
    """The generated part of docs/outputs.md: the results.json table, then one table per nested record."""
    keys = json_keys()
    _check(set(keys), set(DESCRIPTIONS), "results.json")
    fields = {f.name: f for f in dataclasses.fields(model.Results)}
    lines = [MARKERS[0], "", "| key | type | when absent | what |", "|---|---|---|---|"]
    for key in keys:
        field = fields.get(key)
        kind = _type(field.type) if field else "`list[str]`"
        absent = _default(field) if field else "`[]`"
        lines.append(f"| `{key}` | {kind} | {absent} | {DESCRIPTIONS[key]} |")
    for record in NESTED:
        words = NESTED_DESCRIPTIONS[record.__name__]
        names = [f.name for f in dataclasses.fields(record) if f.name != "draws"]
        _check(set(names), set(words), record.__name__)
        doc = " ".join((record.__doc__ or "").split())
        lines += ["", f"**{record.__name__}**: {doc}", "", "| field | type | what |", "|---|---|---|"]
        types = {f.name: f.type for f in dataclasses.fields(record)}
        lines += [f"| `{name}` | {_type(types[name])} | {words[name]} |" for name in names]
    return "\n".join([*lines, "", MARKERS[1]])


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _default(field: dataclasses.Field) -> str:
    """What ``Results.from_json`` takes when an earlier file lacks the key: 'required' for none."""
    if _required(field):
        return "required"
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return f"`{value!r}`".replace("None", "null")


def _type(annotation) -> str:
    return "`" + str(annotation).replace("|", "or").replace(" or None", " or null") + "`"


def _check(found: set[str], described: set[str], what: str) -> None:
    if found - described:
        raise KeyError(f"{what}: describe {sorted(found - described)} in greenlab/analysis/docs_outputs.py")
    if described - found:
        raise KeyError(f"{what}: {sorted(described - found)} described but no longer written")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m greenlab.analysis.docs_outputs", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write it between the markers of {PAGE}")
    args = parser.parse_args(argv)
    if args.write:
        changed = generated.write_generated_part(PAGE, MARKERS, markdown())
        print(f"{PAGE}: {'updated' if changed else 'up to date'}")
    else:
        print(markdown())


if __name__ == "__main__":
    main()
