"""GreenRFM's vision encoder: torchvision's video ResNet (``r3d_18``) with a 1-channel strided stem.

As the official code (SadVoxel/GreenRFM ``models/clip.py``): ``torchvision.models.video.r3d_18`` (VideoResNet:
stem Conv3d + BN + ReLU, no max-pool, layers 2-4 at stride 2), Kinetics-400 weights, ``stem[0]`` replaced by
``Conv3d(1, 64, k, stride=k, padding=0, bias=False)`` (k = 2; the lite model k = 4), so the total stride is 16
(lite 32), global average pool, no classifier: 512-d. Parameter names are torchvision's, so its checkpoints
load strictly. ``depth=10`` (one block per stage) is for tiny tests only.

Axes: greenlab volumes are (B, 1, X, Y, Z) in RAS; the official loader gives the network (B, 1, D, H, W) =
(slices, rows, columns), so the encoder reads the volume as (Z, Y, X).

``forward_features``: (B, 1, X, Y, Z) -> (B, 512, Z/s, Y/s, X/s); ``forward``: global average pool -> (B, 512).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.video import R3D_18_Weights
from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

from greenlab.backbones.weights import init_record, load_exactly, load_weights, read_state_dict
from greenlab.warnings_banner import loud_warning

BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 10: [1, 1, 1, 1]}
KINETICS = R3D_18_Weights.KINETICS400_V1


class ResNet3D(nn.Module):
    """Args: depth (18, or 10 for tests), stem_kernel (= stem stride: 2, lite 4), weights (``cached``:
    Kinetics-400 from torchvision's local cache, never downloaded | ``hub``: downloaded when online |
    ``random`` | a path to a state dict of this encoder or of torchvision's ``r3d_18``)."""

    def __init__(self, depth: int, stem_kernel: int, weights: str | None):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, not {depth}")
        self.net = VideoResNet(BasicBlock, [Conv3DSimple] * 4, BLOCKS_PER_STAGE[depth], BasicStem)
        self.num_features = 512
        self.recipe = {"factory": f"{__name__}.ResNet3D", "depth": depth, "stem_kernel": stem_kernel}
        self.init_record, own_weights = self._initial_weights(weights, depth)
        # the official stem swap, after the Kinetics weights are in (their RGB stem does not fit one channel)
        self.net.stem[0] = nn.Conv3d(
            1, 64, kernel_size=stem_kernel, stride=stem_kernel, padding=0, bias=False
        )
        self.net.avgpool, self.net.fc = nn.AdaptiveAvgPool3d(1), nn.Identity()
        if own_weights is not None:  # a file of this encoder (its 1-channel stem included)
            load_exactly(self, own_weights, Path(weights))

    def _initial_weights(self, weights: str | None, depth: int) -> tuple[dict, dict | None]:
        """(init record, a state dict of this encoder to load after the stem swap, or None). Kinetics-400 or a
        torchvision r3d_18 file go into the trunk here (their RGB stem conv and classifier left out)."""
        if weights in ("random", None):
            return init_record(weights), None
        if weights not in ("cached", "hub"):
            path = Path(weights).expanduser()
            state = read_state_dict(path)
            if "net.stem.0.weight" in state:
                return init_record(weights, "file", str(path.resolve())), state
            self._load_trunk(state, path)
            return init_record(
                weights, "file", str(path.resolve()), "torchvision r3d_18 trunk; new stem"
            ), None
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(KINETICS.url).name
        note = (
            f"Kinetics-400 r3d_18 weights not in torchvision's cache ({file}); weights=cached never downloads"
        )
        if depth == 18 and (file.is_file() or weights == "hub"):
            try:
                state = torch.hub.load_state_dict_from_url(KINETICS.url, map_location="cpu", progress=False)
                self._load_trunk(state, file)
                return init_record(weights, "kinetics400", f"torchvision {KINETICS} ({file})"), None
            except OSError as err:  # no network
                note = f"download of {KINETICS.url} failed: {type(err).__name__}: {err}"
        loud_warning(
            f"3D ResNet-{depth}: Kinetics-400 weights could not be had ({note}).\n"
            "The image encoder starts from RANDOM initialisation; results will not match the paper.\n"
            f"Give backbone.weights=/path/to/{file.name} (torchvision r3d_18), or backbone.weights=hub when online.\n"
            "results.json records init=random."
        )
        return init_record(weights, note=note), None

    def _load_trunk(self, state: dict, path: Path) -> None:
        trunk = {k: v for k, v in state.items() if not k.startswith(("stem.0.", "fc."))}
        missing, unexpected = self.net.load_state_dict(trunk, strict=False)
        if unexpected or set(missing) != {"stem.0.weight", "fc.weight", "fc.bias"}:
            raise ValueError(
                f"weights file {path} does not fit r3d_18: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )

    def forward_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, 512, Z/s, Y/s, X/s), s = 8 x stem_kernel."""
        net = self.net
        x = net.stem(volumes.permute(0, 1, 4, 3, 2))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.forward_features(volumes).mean(dim=(2, 3, 4))


class ThreePlaneEncoder(nn.Module):
    """GreenRFM's MRI encoder: one ``ResNet3D`` per plane (sagittal, coronal, axial), features averaged.

    ``forward``: (B, 3, 1, H, W, S) -> (B, num_features); ``forward_features`` is the same vector.
    Args: those of ``ResNet3D``; ``cached`` / ``hub`` start every branch from Kinetics-400, a path is a
    file of the whole three-branch encoder.
    """

    def __init__(self, depth: int, stem_kernel: int, weights: str | None):
        super().__init__()
        whole_file = weights not in ("random", "cached", "hub", None)
        self.branches = nn.ModuleList(
            ResNet3D(depth, stem_kernel, "random" if whole_file else weights) for _ in range(3)
        )
        self.num_features = self.branches[0].num_features
        self.recipe = {**self.branches[0].recipe, "factory": f"{__name__}.ThreePlaneEncoder"}
        self.init_record = load_weights(self, weights) if whole_file else self.branches[0].init_record

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(planes[:, i]) for i, branch in enumerate(self.branches)]).mean(0)

    def forward_features(self, planes: torch.Tensor) -> torch.Tensor:
        return self(planes)
