"""Masked-dense sparse convolution (SparK's own implementation strategy).

Semantics, shared with the MinkowskiEngine backend: inactive positions are exactly zero; every conv /
pool output is re-masked; BatchNorm statistics are over active positions only; global pooling (inside
squeeze-excite too) is a masked mean. ``sparsify`` turns a dense CNN into this form in place by swapping
each module's class for a masked subclass: weights and parameter names stay those of the dense model.

The active mask lives on the coarsest grid (input / total stride): (B, 1, h, w) bool for images, (B, 1, d, h, w)
for volumes, True = visible. Each layer expands it to its own resolution, which must be a multiple of the mask's.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerNorm2d
from timm.layers.squeeze_excite import SEModule
from timm.models.convnext import ConvNeXtBlock
from torch import nn

_ACTIVE: list[tuple[torch.Tensor, dict]] = []  # (mask, its expansions by size), innermost last


@contextlib.contextmanager
def active_mask(mask: torch.Tensor):
    """Within this block, sparsified modules compute only where ``mask`` (B, 1, *grid) is True."""
    _ACTIVE.append((mask, {}))
    try:
        yield
    finally:
        _ACTIVE.pop()


def mask_at(x: torch.Tensor) -> torch.Tensor:
    """The active mask expanded to ``x``'s spatial size: (B, 1, *x.shape[2:]) bool, each cell repeated as a
    block.

    Built by expand + reshape (``repeat_interleave`` would read its output size back from the device: one
    host-device synchronisation per call, hundreds per step), once per size within the block.
    """
    if not _ACTIVE:
        raise RuntimeError("a sparsified module ran outside `with active_mask(mask):`")
    mask, expanded = _ACTIVE[-1]
    grid = tuple(mask.shape[2:])
    size = tuple(x.shape[-len(grid) :])
    if size not in expanded:
        scales = [n // g for n, g in zip(size, grid)]
        if tuple(s * g for s, g in zip(scales, grid)) != size:
            raise ValueError(f"feature map {size} is not a multiple of the mask grid {grid}")
        b, c = mask.shape[:2]
        interleaved = [v for g, s in zip(grid, scales) for v in (g, s)]  # (g1, s1, g2, s2, ...)
        blocks = mask.reshape(b, c, *[v for g in grid for v in (g, 1)]).expand(b, c, *interleaved)
        expanded[size] = blocks.reshape(b, c, *size)
    return expanded[size]


class MaskedOutput:
    """Conv / pool: the dense op, then zero at inactive positions."""

    def forward(self, x):
        out = super().forward(x)
        return out * mask_at(out)


def batch_norm_rows(bn: nn.modules.batchnorm._BatchNorm, rows: torch.Tensor) -> torch.Tensor:
    """``bn`` applied to (N, C) rows, one row per active position: statistics over active positions only.

    Same running-statistics update as ``nn.BatchNorm2d`` (momentum, or a cumulative mean when None).
    """
    factor = 0.0
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or bn.running_mean is None
    return F.batch_norm(
        rows, bn.running_mean, bn.running_var, bn.weight, bn.bias, use_batch_stats, factor, bn.eps
    )


def masked_batch_norm(
    bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``bn`` on (B, C, *spatial) ``x`` with statistics over the positions where ``mask`` (B, 1, *spatial) is True;
    zero elsewhere. The same function as ``batch_norm_rows`` on the active rows (biased variance to
    normalise, unbiased n/(n-1) in the running variance), computed with masked sums instead of boolean
    indexing: no data-dependent shapes, so no host-device synchronisation and nothing for torch.compile to
    break on. Statistics in float32 at least (float64 stays float64); the output has ``x``'s dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight, values = mask.to(dtype), x.to(dtype)
    over, per_channel = (0, *range(2, x.ndim)), (-1, *[1] * (x.ndim - 2))  # reduce all but C; broadcast C
    if bn.training or bn.running_mean is None:
        count = weight.sum()
        mean = (values * weight).sum(over) / count
        centred = (values - mean.view(per_channel)) * weight
        var = centred.square().sum(over) / count
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum
            if factor is None:  # cumulative moving average
                factor = (1.0 / bn.num_batches_tracked).to(bn.running_mean.dtype)
            with torch.no_grad():
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_((var * count / (count - 1)).to(bn.running_var.dtype), factor)
    else:
        mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
        centred = (values - mean.view(per_channel)) * weight
    out = centred * torch.rsqrt(var + bn.eps).view(per_channel)
    if bn.affine:
        out = (out * bn.weight.view(per_channel) + bn.bias.view(per_channel)) * weight
    return out.to(x.dtype)


class MaskedBatchNorm:
    """BatchNorm over active positions only (+ timm BatchNormAct2d's drop and activation), zero elsewhere."""

    def forward(self, x):
        mask = mask_at(x)
        out = masked_batch_norm(self, x, mask)
        if isinstance(self, BatchNormAct2d):
            out = self.act(self.drop(out)) * mask
        return out


class MaskedSqueezeExcite:
    """timm ``SEModule`` with the global average replaced by the mean over active positions."""

    def forward(self, x):
        mask = mask_at(x).to(x.dtype)
        x_se = (x * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp(min=1.0)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return x * self.gate(x_se)


MASKED_MIXINS: dict[type, type] = {
    SEModule: MaskedSqueezeExcite,  # before its children: its BN acts on (B, C, 1, 1), not on positions
    nn.Conv2d: MaskedOutput,
    nn.Conv3d: MaskedOutput,
    LayerNorm2d: MaskedOutput,
    ConvNeXtBlock: MaskedOutput,  # its LayerNorm and MLP act per position: masking the block's output suffices
    nn.MaxPool2d: MaskedOutput,
    nn.AvgPool2d: MaskedOutput,
    nn.MaxPool3d: MaskedOutput,
    nn.AvgPool3d: MaskedOutput,
    nn.BatchNorm2d: MaskedBatchNorm,  # BatchNormAct2d is a BatchNorm2d
    nn.BatchNorm3d: MaskedBatchNorm,
}


@functools.cache
def _swapped_class(cls: type, mixin: type) -> type:
    return type(f"Sparse{cls.__name__}", (mixin, cls), {"dense_class": cls})


def sparsify(model: nn.Module, mixins: dict[type, type] = MASKED_MIXINS) -> nn.Module:
    """Swap, in place, every supported module of ``model`` for its sparse form; returns ``model``.

    A module whose class matches none of ``mixins`` is left as it is (elementwise ops keep zeros at zero).
    The children of a swapped squeeze-excite are left dense.
    """
    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in skip) or hasattr(type(module), "dense_class"):
            continue
        for base, mixin in mixins.items():
            if isinstance(module, base):
                module.__class__ = _swapped_class(type(module), mixin)
                if base is SEModule:
                    skip.add(name)
                break
    return model


def densify(model: nn.Module) -> nn.Module:
    """Undo ``sparsify`` in place."""
    for module in model.modules():
        if hasattr(type(module), "dense_class"):
            module.__class__ = type(module).dense_class
    return model
