"""OmegaConf resolvers used by the configs in ``conf/``."""

from pathlib import Path

import torch
from omegaconf import OmegaConf


def auto_precision() -> str:
    """Lightning precision flag: bf16 mixed precision on a GPU that supports it, fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def on_cuda(accelerator: str) -> bool:
    """Whether a Trainer with this ``accelerator`` runs on CUDA GPUs (SyncBatchNorm needs them)."""
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
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
