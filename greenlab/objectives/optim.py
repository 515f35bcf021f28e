"""Pieces shared by the objectives: weight-decay groups, AdamW (or LAMB) with a schedule stepped per epoch or
per iteration (optimiser step), loss logging."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def decay_param_groups(
    modules: list[nn.Module],
    weight_decay: float,
    no_decay_names: tuple[str, ...] = (),
    model_skip_list: bool = True,
) -> list[dict]:
    """AdamW groups [decayed, not decayed]: weight decay on weight matrices only; biases, norms, tokens and
    position embeddings (1-D tensors, names listed by a timm model's ``no_weight_decay()`` unless not
    ``model_skip_list``, and parameters whose last name is in ``no_decay_names``) are not decayed."""
    decay, no_decay = [], []
    for module in modules:
        skip = (
            set(module.no_weight_decay()) if model_skip_list and hasattr(module, "no_weight_decay") else set()
        )
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            undecayed = param.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in no_decay_names
            (no_decay if undecayed else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay_list: tuple[str, ...] | set[str] = (),
    vit_prefix: str = "",
) -> list[dict]:
    """RETFound's (BEiT's) layer-wise lr decay, ``util/lr_decay.py`` ``param_groups_lrd``, for a timm ViT at
    ``vit_prefix`` inside ``model`` (``""``: the model is the ViT): one AdamW group per (layer, decayed or not),
    each with its ``lr_scale`` (its lr = the scheduled lr x ``lr_scale``) and ``weight_decay``.

    With ``L = len(blocks)``: layer 0 is ``cls_token``, ``pos_embed`` and ``patch_embed.*`` (and timm's
    ``reg_token``, which RETFound's ViTs do not have; timm's ``group_matcher`` puts it in the stem), layer
    ``i + 1`` is ``blocks.i.*``, and the rest (final norm, ``fc_norm``, head: every parameter outside the ViT)
    is layer ``L + 1``; ``lr_scale = layer_decay ** (L + 1 - layer)``. No weight decay on 1-D parameters
    (biases, norms) nor on the ViT names in ``no_weight_decay_list`` (RETFound: the model's
    ``no_weight_decay()``). Parameters that do not require gradients are left out."""
    vit = model.get_submodule(vit_prefix.rstrip(".")) if vit_prefix else model
    last = len(vit.blocks) + 1  # lr_decay.py: num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        inner = name[len(vit_prefix) :] if name.startswith(vit_prefix) else None
        undecayed = param.ndim == 1 or inner in no_weight_decay_list
        layer = last if inner is None else vit_layer_id(inner, last)
        key = f"layer_{layer}_{'no_decay' if undecayed else 'decay'}"
        if key not in groups:
            groups[key] = {
                "lr_scale": layer_decay ** (last - layer),
                "weight_decay": 0.0 if undecayed else weight_decay,
                "params": [],
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def vit_layer_id(name: str, last: int) -> int:
    """RETFound ``util/lr_decay.py`` ``get_layer_id_for_vit`` (``last`` = its ``num_layers``, blocks + 1)."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return last


def warmup_cosine_factor(
    epoch: float,
    base_lr: float,
    start_lr: float,
    min_lr: float,
    warmup_epochs: int,
    cosine_epochs: int,
    cosine_from_zero: bool = False,
) -> float:
    """Multiplier of ``base_lr`` at ``epoch`` (0-based; a whole number when stepped once per epoch, the
    fraction iteration / iterations per epoch when stepped per iteration, as MAE's ``lr_sched``).

    Linear warm-up from ``start_lr`` to ``base_lr`` over ``warmup_epochs``, then a half cosine down to
    ``min_lr`` ending at epoch ``cosine_epochs`` (warm-up included), and ``min_lr`` after that. The cosine
    starts where the warm-up ends, or, with ``cosine_from_zero``, at epoch 0 with the warm-up overriding its
    first epochs (timm's ``CosineLRScheduler(t_initial=cosine_epochs, warmup_prefix=False)``).
    """
    if epoch < warmup_epochs:
        lr = start_lr + (base_lr - start_lr) * epoch / warmup_epochs
    elif epoch < cosine_epochs:
        start = 0 if cosine_from_zero else warmup_epochs
        progress = (epoch - start) / max(1, cosine_epochs - start)
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    else:
        lr = min_lr
    return lr / base_lr


def optimizer(
    groups: list[dict],
    lr: float,
    betas: tuple[float, float],
    algorithm: str = "adamw",
    max_grad_norm: float = 5.0,
) -> torch.optim.Optimizer:
    """``adamw``: torch AdamW, fused (one kernel for all parameters) when they all live on a GPU: the same
    update, fewer launches. ``lamb``: timm's ``Lamb`` (SparK's ``TheSameAsTimmLAMB``), which clips the global
    gradient norm to ``max_grad_norm`` inside its step (SparK: 5.0)."""
    if algorithm == "adamw":
        on_gpu = all(p.is_cuda for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=on_gpu or None)
    if algorithm == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=tuple(betas), max_grad_norm=max_grad_norm)
    raise ValueError(f"optimizer must be adamw or lamb, not {algorithm!r}")


def adamw(
    groups: list[dict],
    lr: float,
    lr_factor: Callable[[float], float] | list[Callable[[float], float]],
    betas: tuple[float, float] = (0.9, 0.999),
    algorithm: str = "adamw",
    steps_per_epoch: int | None = None,
) -> dict:
    """Lightning's optimiser config: ``optimizer(algorithm)`` (AdamW by default) over ``groups`` at ``lr``,
    times ``lr_factor(epoch)`` (one callable, or one per group): stepped once per epoch, or, given
    ``steps_per_epoch``, after every optimiser step with ``epoch`` = steps so far / ``steps_per_epoch``."""
    built = optimizer(groups, lr, betas, algorithm)
    if steps_per_epoch is None:
        return {
            "optimizer": built,
            "lr_scheduler": {"scheduler": LambdaLR(built, lr_factor), "interval": "epoch"},
        }
    factors = lr_factor if isinstance(lr_factor, list) else [lr_factor] * len(groups)
    per_step = [partial(_at_step, factor=f, steps_per_epoch=steps_per_epoch) for f in factors]
    return {"optimizer": built, "lr_scheduler": {"scheduler": LambdaLR(built, per_step), "interval": "step"}}


def _at_step(step: int, factor: Callable[[float], float], steps_per_epoch: int) -> float:
    return factor(step / steps_per_epoch)


def iterations_per_epoch(module) -> int:
    """Optimiser steps in one training epoch of ``module``'s trainer (its batches / gradient accumulation,
    rounded up), for schedules stepped per iteration; readable in ``configure_optimizers``. 1 outside a
    Trainer (an optimiser built by hand steps its schedule per call)."""
    trainer = getattr(module, "_trainer", module)  # a LightningModule (attached or not), or a Trainer
    if trainer is None:
        return 1
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what estimated_stepping_batches does (it skips it under max_steps)
    batches = trainer.num_training_batches
    if math.isinf(batches):
        raise ValueError("a per-iteration schedule needs a training loader of known length")
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def adamw_warmup_cosine(
    groups: list[dict],
    lr: float,
    start_lr: float,
    min_lr: float,
    warmup_epochs: int,
    cosine_epochs: int,
    betas: tuple[float, float] = (0.9, 0.999),
    cosine_from_zero: bool = False,
    algorithm: str = "adamw",
    steps_per_epoch: int | None = None,
) -> dict:
    """``adamw`` with the linear warm-up + cosine of ``warmup_cosine_factor``, per epoch or (given
    ``steps_per_epoch``) per iteration."""
    factor = partial(
        warmup_cosine_factor, base_lr=lr, start_lr=start_lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
        cosine_epochs=cosine_epochs, cosine_from_zero=cosine_from_zero,
    )  # fmt: skip
    return adamw(groups, lr, factor, betas, algorithm, steps_per_epoch)


@contextmanager
def layout_independent_init(seed: int = 0):
    """Initialise modules built in ``setup`` (heads sized from the data) from a fixed seed, so the same
    config gives the same weights whatever ran before: one process or DDP, fresh or resumed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def effective_batch_size(trainer) -> int:
    """The global batch of one optimiser step: processes x gradient-accumulation steps x the data's
    per-process ``batch_size`` (MAE's ``eff_batch_size = batch_size * accum_iter * world_size``)."""
    per_process = getattr(trainer.datamodule, "batch_size", None)
    if not isinstance(per_process, int):
        raise ValueError(
            "the global batch needs the trainer's datamodule and its batch_size (trainer.fit(..., datamodule=))"
        )
    return trainer.world_size * trainer.accumulate_grad_batches * per_process


def log_train_loss(module, loss, batch_size: int) -> None:
    """Log ``train/loss`` per step and per epoch (progress bar; averaged across DDP ranks)."""
    module.log(
        "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True
    )
