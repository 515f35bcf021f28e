"""Where the configs live, the OmegaConf resolvers they use, and ``build``: one config-group option as an object.

Values have one home: the group YAML under ``greenlab/conf/`` (the Python signatures restate none of them). In code,
``build("objective/mae", backbone=vit, mask_ratio=0.5)`` gives the object the YAML describes, with the
arguments given replacing its values.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "conf"  # greenlab/conf/, package data: installed with greenlab


def auto_precision() -> str:
    """Lightning precision flag: bf16 mixed precision on a GPU that supports it, fp32 elsewhere."""
    import torch  # here, not at the top: the command line answers refusals without loading torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
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
    lines = []
    for name in experiments():
        header = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
        example = next((h.lstrip("# ").split("  #")[0].strip() for h in header if f"+experiment={name}" in h),
                       f"greenlab +experiment={name}")  # fmt: skip
        lines.append(f"  {name:<28} {example.replace('python -m greenlab', 'greenlab')}")
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


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# dotted key: (test, what is allowed). Checked at start-up on the composed config, where the key exists.
VALUE_RULES = {
    "seed": (_integer, "an integer"),
    "img_size": (lambda v: _integer(v) and v >= 8, "an integer >= 8 (px)"),
    "trainer.max_epochs": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "trainer.accumulate_grad_batches": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v is None or (_number(v) and v > 0), "a number > 0, or null"),
    "trainer.log_every_n_steps": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "data.batch_size": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "data.eval_batch_size": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "data.held_out_fraction": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "data.split_seed": (_integer, "an integer"),
    "objective.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "objective.base_lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "objective.min_lr": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "objective.start_lr": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "objective.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "objective.mask_ratio": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "objective.warmup_epochs": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "objective.cosine_epochs": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "evaluation.bootstrap_resamples": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "evaluation.ci_resamples": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "evaluation.folds": (lambda v: _integer(v) and v >= 2, "an integer >= 2"),
    "evaluation.epochs": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
}


def check_values(cfg) -> None:
    """Refuse, before anything runs, a composed config whose values do not fit ``VALUE_RULES`` (e.g.
    ``trainer.max_epochs=abc``, ``data.held_out_fraction=1.0``): one error naming every such key, its value
    and what is allowed."""
    from omegaconf.errors import OmegaConfBaseException

    problems = []
    for key, (test, allowed) in VALUE_RULES.items():
        parent, _, leaf = key.rpartition(".")
        try:
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not OmegaConf.is_dict(node) or leaf not in node or OmegaConf.is_missing(node, leaf):
                continue  # not part of this config, or left to the experiment to set (checked elsewhere)
            value = node[leaf]
        except OmegaConfBaseException as err:  # an interpolation that does not resolve
            problems.append(f"{key}: {err}")
            continue
        if not test(value):
            problems.append(f"{key}={value!r}: expected {allowed}")
    if problems:
        raise ValueError("invalid config values: " + "; ".join(problems))
