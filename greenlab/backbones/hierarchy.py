"""CNN feature hierarchies: which modules' outputs are the maps at strides 2 .. 32 (in 3D up to the network's
own total stride), read from timm's ``feature_info``, and the forward that returns them.

A hierarchical backbone carries ``tap_names`` (module names, shallowest first), ``strides`` (input pixels per
map position) and ``channels``. A network that reorders its input's axes first (GreenRFM's 3D ResNet) has
``to_network`` (that reordering) and ``forward_network`` (the rest); its maps are in the network's order.
``stem_name`` names the module whose output grid Token Reconstruction corrupts on CNNs (``stem`` where the
network has one, as timm's ConvNeXt, ReXNet and RegNet; else the first map, e.g. ResNet's ``act1`` after
conv1-bn1-ReLU). Nothing is added to the state dict: a timm model stays loadable into
``timm.create_model(name)``.
"""

from __future__ import annotations

import torch
from torch import nn

DOWNSAMPLE = 32  # SparK's total stride for 2D CNNs: the mask grid is input / 32


def tap_feature_info(model: nn.Module, strides: list[int] | None) -> None:
    """Set ``stem_name`` on a timm CNN, and ``tap_names``, ``strides``, ``channels`` from its
    ``feature_info``: per stride the deepest module at that stride (``strides``: the ones to keep, None = all
    of them). Maps that do not reach stride 32 in powers of two (e.g. ``output_stride=16``) are no hierarchy:
    left out when ``strides`` is None, an error when asked for."""
    deepest = {}
    for info in getattr(model, "feature_info", None) or []:
        deepest[info["reduction"]] = info
    if not deepest:
        return
    model.stem_name = (
        "stem"
        if isinstance(getattr(model, "stem", None), nn.Module)
        else next(iter(deepest.values()))["module"]
    )
    kept = sorted(deepest) if strides is None else list(strides)
    missing = [s for s in kept if s not in deepest]
    if missing or (strides is not None and not is_hierarchy(kept)):
        raise ValueError(
            f"feature_strides={kept}: {type(model).__name__} has maps at strides {sorted(deepest)}; a hierarchy "
            f"is a subset of them in powers of two up to {DOWNSAMPLE}"
        )
    if is_hierarchy(kept):
        model.tap_names = [deepest[s]["module"] for s in kept]
        model.strides = kept
        model.channels = [deepest[s]["num_chs"] for s in kept]


def is_hierarchy(strides: list[int], total: int | None = DOWNSAMPLE) -> bool:
    """Distinct powers of two, increasing, ending at ``total`` (SparK's 32 for 2D CNNs; None: any total of 8 or
    more, as a 3D encoder's own, r3d_18's 16)."""
    return (
        bool(strides)
        and (strides[-1] == total if total else strides[-1] >= 8)
        and all(s > 1 and s & (s - 1) == 0 for s in strides)
        and all(a < b for a, b in zip(strides, strides[1:]))
    )


def spatial_dims(backbone: nn.Module) -> int:
    """3 for a network with 3D convolutions (it takes volumes), else 2."""
    return 3 if any(isinstance(m, nn.Conv3d) for m in backbone.modules()) else 2


def first_conv(backbone: nn.Module) -> nn.Module:
    """The network's first convolution (its ``in_channels`` are the input's channels)."""
    return next(m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


def to_network(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the backbone's own axis order (its ``to_network``; unchanged for most networks)."""
    return backbone.to_network(x) if hasattr(backbone, "to_network") else x


def forward_hierarchy(backbone: nn.Module, x) -> list:
    """The maps at ``backbone.strides``, shallowest first (dense tensors, or MinkowskiEngine sparse tensors
    after ``greenlab.sparse.minkowski.sparsify``): the outputs of ``backbone.tap_names`` during
    ``forward_features(x)`` (``forward_network(x)`` where the backbone has one: ``x`` already in its order,
    ``to_network``), taken by forward hooks (after the model's own hooks, e.g. nn-MobileNet's spatial
    dropout)."""
    maps: dict[str, object] = {}
    handles = [
        backbone.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: maps.__setitem__(name, output)
        )
        for name in backbone.tap_names
    ]
    try:
        getattr(backbone, "forward_network", backbone.forward_features)(x)
    finally:
        for handle in handles:
            handle.remove()
    return [maps[name] for name in backbone.tap_names]


@torch.no_grad()
def probe_stem(backbone: nn.Module) -> tuple[int, int]:
    """(channels, stride) of ``backbone.stem_name``'s output, measured on one 64 px image (a 32^3 volume for a
    3D network) in eval mode: no statistic is updated."""
    first = first_conv(backbone)
    side = 32 if isinstance(first, nn.Conv3d) else 64
    seen = {}
    handle = backbone.get_submodule(backbone.stem_name).register_forward_hook(
        lambda module, inputs, output: seen.update(shape=output.shape)
    )
    was_training = backbone.training
    try:
        probe = first.weight.new_zeros(1, first.in_channels, *[side] * (first.weight.ndim - 2))
        backbone.eval().forward_features(probe)
    finally:
        handle.remove()
        backbone.train(was_training)
    return seen["shape"][1], side // seen["shape"][-1]
