"""OmegaConf resolvers used by the configs in ``conf/``."""

import torch
from omegaconf import OmegaConf


def auto_precision() -> str:
    """Lightning precision flag: bf16 mixed precision on a GPU that supports it, fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("greenlab.auto_precision"):
        OmegaConf.register_new_resolver("greenlab.auto_precision", auto_precision)
