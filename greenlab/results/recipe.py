"""How a run differs from its paper's recipe: results.json ``recipe = {faithful, deviations: [{key, paper,
used, why}]}``.

An experiment's paper recipe is written once: its config at ``scale=paper`` (``greenlab/conf/experiment/<name>.yaml``
over the groups). A run's composed config is compared with it key by key, leaving out what does not change
the method (hardware, paths, logging, the data source itself: only settings that both data configs have
are compared; the probe datasets are data too), and the initialisation actually used is compared with the one asked for (random instead of
DINOv2 / Kinetics / CXR-BERT weights is a deviation). The batch is compared as the global batch of an
optimiser step (``effective_batch_size`` = processes x ``trainer.accumulate_grad_batches`` x
``data.batch_size``): 4 GPUs at the paper's per-process batch are a deviation, a quarter of it on each is not.
"""

from __future__ import annotations

from greenlab.results.model import Recipe

NOT_RECIPE = (  # keys (and everything below them) that do not change the method
    "name", "scale_name", "seed", "paths", "hydra", "logger", "callbacks", "compute", "evaluate_initial_backbone",
    "compile", "channels_last", "resume",  # the same maths, another speed or memory layout; how a run resumes
    "ddp_find_unused_parameters", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.sync_batchnorm", "trainer.use_distributed_sampler",
    "trainer.default_root_dir", "trainer.log_every_n_steps", "trainer.fast_dev_run", "trainer.deterministic",
    "data._target_", "data.num_workers", "data.output_dir", "data.cache_dir", "data.pixel_cache_dir", "data.eval_batch_size",
    "objective.figure_dir", "objective.figure_every_n_epochs", "evaluation.num_workers",
    "backbone.weights", "text_encoder.weights", "text_encoder.download",  # where weights come from: see init
)  # fmt: skip
BATCH_PARTS = ("data.batch_size", "trainer.accumulate_grad_batches")  # compared as their product x processes
WEIGHTS_OF = {"": "backbone", "image": "backbone", "text": "text_encoder"}  # init record part -> config group


def flatten(node, prefix: str = "") -> dict:
    """{dotted key: value} of a nested container (lists are values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _recipe_keys(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NOT_RECIPE)}


def deviations(used: dict, paper: dict, scaled: dict, init_record: dict, world_size: int = 1) -> dict:
    """Unresolved configs as containers. ``used``: the run's, as composed, on ``world_size`` processes;
    ``paper``: its experiment at scale=paper; ``scaled``: its experiment at the run's scale without the
    command line's other overrides (tells a scale's change from an override)."""
    now, recipe = _recipe_keys(flatten(used)), _recipe_keys(flatten(paper))
    by_scale = flatten(scaled)
    found = batch_deviations(now, recipe, by_scale, world_size, f"scale={used.get('scale_name')}")
    for key in sorted(set(now) | set(recipe)):
        if key in BATCH_PARTS:
            continue
        if key.startswith("data.") and (key not in now or key not in recipe):
            continue  # the data source itself: its own settings, not the recipe's
        if key.startswith("evaluation.datasets."):
            continue  # which labelled sets are probed: data, not method (results.json names them)
        if now.get(key) != recipe.get(key):
            why = f"scale={used.get('scale_name')}" if by_scale.get(key) == now.get(key) else "override"
            found.append({"key": key, "paper": recipe.get(key), "used": now.get(key), "why": why})
    found += init_deviations(init_record, paper)
    return {"faithful": not found, "deviations": found}


def effective_batch(flat: dict, world_size: int) -> int | None:
    """processes x accumulation x per-process batch of a flattened config; None without a data batch."""
    batch, accumulate = (flat.get(k) for k in BATCH_PARTS)
    if not isinstance(batch, int):
        return None
    return world_size * (accumulate if isinstance(accumulate, int) else 1) * batch


def paper_processes(flat: dict) -> int:
    """The processes the paper recipe names (trainer.devices x num_nodes when both are numbers), else 1."""
    devices, nodes = flat.get("trainer.devices", 1), flat.get("trainer.num_nodes", 1)
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else 1


def batch_deviations(now: dict, recipe: dict, by_scale: dict, world_size: int, scale: str) -> list[dict]:
    """The global batch against the paper's (``effective_batch_size``), the parts named in ``why``."""
    used, asked = effective_batch(now, world_size), effective_batch(recipe, paper_processes(recipe))
    if used is None or asked is None or used == asked:
        return []
    parts = f"{world_size} process(es) x {now.get(BATCH_PARTS[1], 1)} accumulation x {now[BATCH_PARTS[0]]} per process"
    source = scale if effective_batch(by_scale, world_size) == used and world_size == 1 else "override"
    return [{"key": "effective_batch_size", "paper": asked, "used": used, "why": f"{source}: {parts}"}]


def init_deviations(record: dict, paper: dict) -> list[dict]:
    """The paper's weights (``backbone.weights``, ``text_encoder.weights`` not ``random``) that this run did
    not start from: a random initialisation instead, asked for or because the weights could not be had."""
    parts = {"": record} if "used" in record else record
    found = []
    for part, sub in parts.items():
        asked = paper.get(WEIGHTS_OF[part], {}).get("weights", "random")
        if asked not in ("random", None) and sub["used"] == "random":
            why = sub.get("note") or f"weights={sub['requested']}"
            found.append({"key": f"init.{part}.used" if part else "init.used", "paper": asked, "used": "random",
                          "why": why})  # fmt: skip
    return found


def markdown(recipe: Recipe) -> list[str]:
    """The results.md lines: faithful, or a table of the deviations."""
    if recipe.faithful is None:
        return [f"- recipe: {recipe.note}"]
    if recipe.faithful:
        return [f"- recipe: **faithful** to the paper recipe of `{recipe.experiment}` (scale=paper)"]
    lines = ["", f"## Deviations from the paper recipe (`{recipe.experiment}` at scale=paper)", "",
             "| key | paper | used | why |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| `{d.key}` | {d.paper} | {d.used} | {d.why} |" for d in recipe.deviations]
    return lines
