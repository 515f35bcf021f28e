"""Pieces shared by the objectives: weight-decay groups, the warm-up + cosine schedule, loss logging."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn


def decay_param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; biases, norms, tokens and position embeddings
    (1-D tensors and names listed by a timm model's ``no_weight_decay()``) are not decayed."""
    decay, no_decay = [], []
    for module in modules:
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine_factor(
    epoch: int, base_lr: float, start_lr: float, min_lr: float, warmup_epochs: int, cosine_epochs: int
) -> float:
    """Multiplier of ``base_lr`` at ``epoch`` (0-based, stepped once per epoch).

    Linear warm-up from ``start_lr`` to ``base_lr`` over ``warmup_epochs``, then a half cosine down to
    ``min_lr`` ending at epoch ``cosine_epochs`` (warm-up included), and ``min_lr`` after that.
    """
    if epoch < warmup_epochs:
        lr = start_lr + (base_lr - start_lr) * epoch / warmup_epochs
    elif epoch < cosine_epochs:
        progress = (epoch - warmup_epochs) / max(1, cosine_epochs - warmup_epochs)
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    else:
        lr = min_lr
    return lr / base_lr


@contextmanager
def layout_independent_init(seed: int = 0):
    """Initialise modules built in ``setup`` (heads sized from the data) from a fixed seed, so the same
    config gives the same weights whatever ran before: one process or DDP, fresh or resumed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def log_train_loss(module, loss, batch_size: int) -> None:
    """Log ``train/loss`` per step and per epoch (progress bar; averaged across DDP ranks)."""
    module.log(
        "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True
    )
