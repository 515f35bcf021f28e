"""GreenRFM's vision encoder: torchvision's video ResNet (``r3d_18``) with a 1-channel strided stem.

As the official code (SadVoxel/GreenRFM ``models/clip.py``): ``torchvision.models.video.r3d_18`` (VideoResNet:
stem Conv3d + BN + ReLU, no max-pool, layers 2-4 at stride 2), Kinetics-400 weights, ``stem[0]`` replaced by
``Conv3d(1, 64, k, stride=k, padding=0, bias=False)`` (k = 2; the lite model k = 4), so the total stride is 16
(lite 32), global average pool, no classifier: 512-d. Parameter names are torchvision's, so its checkpoints
load strictly. ``depth=10`` (one block per stage) is for tiny tests only.

Axes: greenlab volumes are (B, 1, X, Y, Z) in RAS; the official loader gives the network (B, 1, D, H, W) =
(slices, rows, columns), so the encoder reads the volume as (Z, Y, X).

``forward_features``: (B, 1, X, Y, Z) -> (B, 512, Z/s, Y/s, X/s); ``forward``: global average pool -> (B, 512).
As a feature hierarchy (greenlab/backbones/hierarchy.py, for SparK in 3D): layer1-4's maps at strides k, 2k, 4k,
8k with 64 / 128 / 256 / 512 channels, in the network's own axis order (``to_network``, then
``forward_network``); the stem (conv-BN-ReLU) is ``stem_name``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video import R3D_18_Weights
from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

from greenlab.backbones.weights import Pretrained, load_exactly, resolve_weights, torch_hub_weights

BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 10: [1, 1, 1, 1]}
KINETICS = R3D_18_Weights.KINETICS400_V1
HINT = (f"Give backbone.weights=/path/to/{KINETICS.url.rsplit('/', 1)[-1]} (torchvision r3d_18), or "
        "backbone.weights=hub when online.")  # fmt: skip


def kinetics_weights(depth: int) -> Pretrained | None:
    """torchvision's Kinetics-400 r3d_18 weights (torch hub's cache / its URL); none for other depths."""
    return torch_hub_weights(f"torchvision {KINETICS}", KINETICS.url) if depth == 18 else None


class ResNet3D(nn.Module):
    """Args: depth (18, or 10 for tests), stem_kernel (= stem stride: 2, lite 4), weights (``cached``:
    Kinetics-400 from torchvision's local cache, never downloaded | ``hub``: downloaded when online |
    ``random`` | a path to a state dict of this encoder or of torchvision's ``r3d_18``)."""

    def __init__(self, depth: int, stem_kernel: int, weights: str | None):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, not {depth}")
        self.net = VideoResNet(BasicBlock, [Conv3DSimple] * 4, BLOCKS_PER_STAGE[depth], BasicStem)
        # the official stem swap (an RGB stem does not fit one channel), no classifier
        self.net.stem[0] = nn.Conv3d(
            1, 64, kernel_size=stem_kernel, stride=stem_kernel, padding=0, bias=False
        )
        self.net.avgpool, self.net.fc = nn.AdaptiveAvgPool3d(1), nn.Identity()
        self.num_features = 512
        self.tap_names = [f"net.layer{i}" for i in range(1, 5)]
        self.strides = [stem_kernel * 2**i for i in range(4)]
        self.channels = [64, 128, 256, 512]
        self.stem_name = "net.stem"
        self.recipe = {"factory": f"{__name__}.ResNet3D", "depth": depth, "stem_kernel": stem_kernel}
        state, self.init_record = resolve_weights(
            weights, kinetics_weights(depth), f"3D ResNet-{depth}", HINT
        )
        if state is not None:
            self.init_record["note"] = self.load_initial(state, self.init_record["source"])

    def load_initial(self, state: dict, where: str) -> str | None:
        """Load a state dict of this encoder (its 1-channel stem included), or of torchvision's ``r3d_18``
        (Kinetics-400 or a file) into the trunk, its RGB stem conv and classifier left out; returns the note
        for the init record."""
        if "net.stem.0.weight" in state:
            load_exactly(self, state, where)
            return None
        trunk = {k: v for k, v in state.items() if not k.startswith(("stem.0.", "fc."))}
        own_stem = {"stem.0.weight": self.net.stem[0].weight.detach()}  # the new stem keeps its own init
        load_exactly(self.net, {**trunk, **own_stem}, where, in_file=state)
        return "torchvision r3d_18 trunk; new stem"

    @staticmethod
    def to_network(volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) greenlab's layout -> (B, 1, Z, Y, X), the official loader's (D, H, W)."""
        return volumes.permute(0, 1, 4, 3, 2)

    def forward_network(self, x):
        """The trunk on the network's layout (dense, or a sparse tensor after sparsification)."""
        net = self.net
        return net.layer4(net.layer3(net.layer2(net.layer1(net.stem(x)))))

    def forward_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, 512, Z/s, Y/s, X/s), s = 8 x stem_kernel."""
        return self.forward_network(self.to_network(volumes))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.forward_features(volumes).mean(dim=(2, 3, 4))


class ThreePlaneEncoder(nn.Module):
    """GreenRFM's MRI encoder: one ``ResNet3D`` per plane (sagittal, coronal, axial), features averaged.

    ``forward``: (B, 3, 1, H, W, S) -> (B, num_features); ``forward_features`` is the same vector.
    Args: those of ``ResNet3D``; ``cached`` / ``hub`` start every branch from Kinetics-400, a path is a
    file of the whole three-branch encoder or one for every branch (``ResNet3D``'s).
    """

    def __init__(self, depth: int, stem_kernel: int, weights: str | None):
        super().__init__()
        self.branches = nn.ModuleList(ResNet3D(depth, stem_kernel, "random") for _ in range(3))
        self.num_features = self.branches[0].num_features
        self.recipe = {**self.branches[0].recipe, "factory": f"{__name__}.ThreePlaneEncoder"}
        state, self.init_record = resolve_weights(
            weights, kinetics_weights(depth), f"3D ResNet-{depth}", HINT
        )
        if state is not None and any(k.startswith("branches.") for k in state):
            load_exactly(self, state, self.init_record["source"])
        elif state is not None:  # one encoder's file (or Kinetics-400) for every branch
            for branch in self.branches:
                note = branch.load_initial(state, self.init_record["source"])
            self.init_record["note"] = note

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(planes[:, i]) for i, branch in enumerate(self.branches)]).mean(0)

    def forward_features(self, planes: torch.Tensor) -> torch.Tensor:
        return self(planes)
