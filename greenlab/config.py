"""Where the configs live, the OmegaConf resolvers they use, and ``build``: one config-group option as an object.

Values have one home: the group YAML under ``greenlab/conf/`` (the Python signatures restate none of them). In code,
``build("objective/mae", backbone=vit, mask_ratio=0.5)`` gives the object the YAML describes, with the
arguments given replacing its values.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "conf"  # greenlab/conf/, package data: installed with greenlab


def auto_precision(mixed: str = "bf16-mixed") -> str:
    """Lightning precision flag: on a CUDA GPU ``mixed`` (``bf16-mixed`` where the GPU supports bf16, else
    fp32; ``16-mixed``: fp16 autocast with a loss scaler, MAE's), fp32 elsewhere."""
    import torch  # here, not at the top: the command line answers refusals without loading torch

    if mixed not in ("bf16-mixed", "16-mixed"):
        raise ValueError(f"greenlab.auto_precision takes bf16-mixed or 16-mixed, not {mixed!r}")
    if not torch.cuda.is_available():
        return "32-true"
    if mixed == "16-mixed" or torch.cuda.is_bf16_supported():
        return mixed
    return "32-true"


def on_cuda(accelerator: str) -> bool:
    """Whether a Trainer with this ``accelerator`` runs on CUDA GPUs (SyncBatchNorm needs them)."""
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def run_group(name: str, mode, sweep_dir: str) -> str:
    """W&B group: the experiment name for a single run; ``<name>-sweep-<sweep folder>`` for every job of
    one multirun (so each sweep is one group, locally or on SLURM)."""
    return f"{name}-sweep-{Path(sweep_dir).name}" if "MULTIRUN" in str(mode) else name


def register_resolvers() -> None:
    for name, function in (
        ("greenlab.auto_precision", auto_precision),
        ("greenlab.on_cuda", on_cuda),
        ("greenlab.run_group", run_group),
        ("greenlab.experiment_examples", experiment_examples),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


def experiments() -> list[str]:
    """The names of the experiments in ``greenlab/conf/experiment``."""
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def experiment_examples() -> str:
    """One line per experiment: its name and the first example command in its file's header."""
    lines, width = [], max(map(len, experiments())) + 1
    for name in experiments():
        header = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
        example = next((h.lstrip("# ").split("  #")[0].strip() for h in header if f"+experiment={name}" in h),
                       f"greenlab +experiment={name}")  # fmt: skip
        lines.append(f"  {name:<{width}} {example.replace('python -m greenlab', 'greenlab')}")
    return "\n".join(lines)


def build(option: str, /, overrides: list[str] = (), select: str | None = None, **arguments):
    """The object that config-group ``option`` ("group/name") describes, ``arguments`` replacing values
    (``select``: one key inside the option, e.g. ``build("callbacks/default", select="compute_monitor")``).

    Interpolations into other groups (``${data.batch_size}``, ``${img_size}``) take the values of the primary
    config; ``overrides`` are Hydra overrides of it (e.g. ``["img_size=56"]``). Outside a run the output
    folder is the current directory.
    """
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    group, name = option.rsplit("/", 1)
    primary = OmegaConf.load(CONFIG_DIR / "config.yaml")
    in_primary = any(isinstance(d, dict) and group in d for d in OmegaConf.to_container(primary.defaults))
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name="build"):
        cfg = compose(
            "config",
            overrides=[
                f"{'' if in_primary else '+'}{group}={name}",
                f"paths.output_dir={Path.cwd()}",
                *overrides,
            ],
        )
    node = OmegaConf.select(cfg, ".".join(filter(None, (group.replace("/", "."), select))))
    OmegaConf.set_struct(cfg, False)
    for key in arguments:
        if key in node:  # (pop would resolve the value first)
            del node[key]
    return instantiate(node, _partial_=True)(**arguments)


# What a value may be, in words that are also its test (``allows``): "true or false"; or "an integer" / "a number",
# then optionally ">= x", "> x" or "in [a, b)" (a bracket includes its end, a parenthesis does not), then optionally
# ", or null"; a trailing "(...)" is a note.
RULE = re.compile(r"(?P<kind>an integer|a number)(?: (?P<op>>=|>) (?P<bound>[-.\de]+)"
                  r"| in (?P<left>[\[(])(?P<low>[-.\de]+), (?P<high>[-.\de]+)(?P<right>[\])]))?(?P<null>, or null)?(?: \(.+\))?")  # fmt: skip

# Config group: the package that reads its values and whose ``VALUE_RULES`` (keys inside the group) say what they
# may be.
GROUP_RULES = {
    "data": "greenlab.data",
    "objective": "greenlab.objectives",
    "evaluation": "greenlab.evaluation",
}

# The values no package's ``VALUE_RULES`` covers: the primary configs' (greenlab/conf/config.yaml, evaluate.yaml)
# and the trainer's (Lightning's arguments). Dotted key: what is allowed.
VALUE_RULES = {
    "seed": "an integer",
    "img_size": "an integer >= 8 (px)",
    "compile": "true or false",
    "channels_last": "true or false",
    "trainer.max_epochs": "an integer >= 1",
    "trainer.accumulate_grad_batches": "an integer >= 1",
    "trainer.gradient_clip_val": "a number > 0, or null",
    "trainer.log_every_n_steps": "an integer >= 1",
}


def value_rules() -> dict[str, str]:
    """Dotted key: what is allowed; ``VALUE_RULES`` and those of each group's package (``GROUP_RULES``)."""
    from importlib import import_module

    rules = dict(VALUE_RULES)
    for group, package in GROUP_RULES.items():
        rules.update({f"{group}.{key}": rule for key, rule in import_module(package).VALUE_RULES.items()})
    return rules


def allows(rule: str, value) -> bool:
    """Whether ``value`` is what ``rule`` (the words of ``RULE``) allows; booleans are not numbers."""
    if rule == "true or false":
        return isinstance(value, bool)
    match = RULE.fullmatch(rule)
    if match is None:
        raise ValueError(f"value rule {rule!r} is not in the words greenlab.config.RULE reads")
    if value is None:
        return match["null"] is not None
    kind = int if match["kind"] == "an integer" else int | float
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    if match["op"]:
        return value >= float(match["bound"]) if match["op"] == ">=" else value > float(match["bound"])
    if match["left"]:
        low, high = float(match["low"]), float(match["high"])
        above = low <= value if match["left"] == "[" else low < value
        return above and (value < high if match["right"] == ")" else value <= high)
    return True


def check_values(cfg) -> None:
    """Refuse, before anything runs, a composed config whose values do not fit their rules (``value_rules``, e.g.
    ``trainer.max_epochs=abc``, ``data.held_out_fraction=1.0``): one error naming every such key, its value
    and what is allowed."""
    from omegaconf.errors import OmegaConfBaseException

    problems = []
    for key, rule in value_rules().items():
        parent, _, leaf = key.rpartition(".")
        try:
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not OmegaConf.is_dict(node) or leaf not in node or OmegaConf.is_missing(node, leaf):
                continue  # not part of this config, or left to the experiment to set (checked elsewhere)
            value = node[leaf]
        except OmegaConfBaseException as err:  # an interpolation that does not resolve
            problems.append(f"{key}: {err}")
            continue
        if not allows(rule, value):
            problems.append(f"{key}={value!r}: expected {rule}")
    if problems:
        raise ValueError("invalid config values: " + "; ".join(problems))
