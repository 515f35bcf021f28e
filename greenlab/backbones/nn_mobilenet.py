"""nn-MobileNet (Zhu et al.): the ReXNet-V1 width-3.0 trunk (timm ``rexnet_300``) with spatial dropout.

Hierarchical feature maps at strides 2 / 4 / 8 / 16 / 32 with 48 / 116 / 183 / 386 / 3840 channels at
width 3.0 (the /32 map is the final 1x1 conv to 3840 channels, SiLU). ~30.9M parameters without a head.
Spatial dropout (``nn.Dropout2d``) is applied to each inverted-residual block's output, after the residual
add, as nn-MobileNet's released ``model/resnext.py`` (``LinearBottleneck.drop``, p = ``--drop_path`` 0.3 in its
``main.py``); it has no parameters, so the state dict is timm's ``rexnet_300`` without its head, and
``weights=cached | hub`` are timm's ImageNet ReXNet weights (``timm/rexnet_300.nav_in1k``, nn-MobileNet's
fine-tuning start ``rexnet_3.0.pth``) from the local Hugging Face cache / the hub
(greenlab/backbones/weights.py). A path may also hold the original layout: clovaai/rexnet's ``rexnet_3.0.pth``
(nn-MobileNet main.py loads it with ``strict=False``) or a checkpoint of
nn-MobileNet's own code (``features.<i>...``): the same tensors in the same order, renamed by position
(``from_original_layout``), every shape checked, the classifier left out as there.
"""

from __future__ import annotations

import timm
import torch
from timm.models.rexnet import LinearBottleneck
from torch import nn

from greenlab.backbones.weights import load_exactly, resolve_weights, timm_hub_weights

HINT = (
    "Give backbone.weights=/path/to/rexnet_300 weights (timm or SparK), or backbone.weights=hub when online."
)


class NNMobileNet(nn.Module):
    """Args: model_name (a timm ReXNet; ``rexnet_100`` for small tests), spatial_dropout (Dropout2d p),
    weights (``random`` | ``cached`` / ``hub``: timm's ImageNet weights of ``model_name`` | a path to a state
    dict of this model / timm's ReXNet, e.g. a SparK encoder)."""

    def __init__(self, model_name: str, spatial_dropout: float, weights: str | None):
        super().__init__()
        trunk = timm.create_model(model_name, pretrained=False, num_classes=0)
        self.stem, self.features = trunk.stem, trunk.features
        for block in self.features:
            if isinstance(block, LinearBottleneck):
                block.spatial_dropout = nn.Dropout2d(spatial_dropout)
                block.register_forward_hook(_dropout_after_block)
        info = {f["reduction"]: f for f in trunk.feature_info}
        self.tap_names = [info[r]["module"] for r in (2, 4, 8, 16)] + [f"features.{len(self.features) - 1}"]
        self.strides = [2, 4, 8, 16, 32]  # greenlab.backbones.hierarchy: the maps SparK's decoder reads
        self.stem_name = "stem"
        self.channels = [info[r]["num_chs"] for r in (2, 4, 8, 16)] + [trunk.num_features]
        self.num_features = trunk.num_features
        self.recipe = {"factory": f"{__name__}.NNMobileNet", "model_name": model_name,
                       "spatial_dropout": spatial_dropout}  # fmt: skip
        state, self.init_record = resolve_weights(weights, timm_hub_weights(trunk.pretrained_cfg),
                                                  f"nn-MobileNet {model_name}", HINT)  # fmt: skip
        if state is not None:  # timm's classifier (head.*) is not part of the trunk
            if "stem.conv.weight" not in state and "features.0.weight" in state:
                state = from_original_layout(state, self, self.init_record["source"])
            load_exactly(self, {k: v for k, v in state.items() if not k.startswith("head.")},
                         self.init_record["source"])  # fmt: skip

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features, H/32, W/32)."""
        return self.features(self.stem(x))


def from_original_layout(state: dict, model: nn.Module, where: str) -> dict:
    """A state dict in clovaai/rexnet's (= nn-MobileNet's) ReXNet-V1 layout (``features.0`` stem conv,
    ``features.<i>.out.<j>`` blocks, ``output.*`` classifier) -> timm's names for ``model``, by position: both
    list the stem, then per block expansion / depthwise / squeeze-excite / projection, then the final conv,
    each BatchNorm as weight, bias, running mean, running var (``num_batches_tracked`` as the file has it)."""
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    theirs = [
        k for k in state if not k.startswith(("output.", "out.")) and not k.endswith("num_batches_tracked")
    ]
    if len(ours) != len(theirs):
        raise ValueError(f"weights file {where}: {len(theirs)} tensors in clovaai's ReXNet layout, "
                         f"{type(model).__name__} has {len(ours)}: another width or depth?")  # fmt: skip
    renamed = {}
    for mine, original in zip(ours, theirs):
        if tuple(state[original].shape) != tuple(model.state_dict()[mine].shape):
            raise ValueError(f"weights file {where}: {original} {tuple(state[original].shape)} does not fit "
                             f"{mine} {tuple(model.state_dict()[mine].shape)}")  # fmt: skip
        renamed[mine] = state[original]
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            renamed[key] = value
    return renamed


def _dropout_after_block(block: nn.Module, inputs, output):
    """Forward hook: the block's spatial dropout on its output (after the residual add)."""
    return block.spatial_dropout(output)
