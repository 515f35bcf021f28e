"""3D ResNet from MONAI with GreenRFM's 1-channel stem: Conv3d(k, stride k) (k = 2; the lite model k = 4).

``forward_features``: (B, 1, D, H, W) -> (B, 512, d, h, w); ``forward``: global average pool -> (B, 512).
"""

from __future__ import annotations

import torch
from monai.networks import nets
from torch import nn

from greenlab.backbones.weights import load_weights


class ResNet3D(nn.Module):
    """Args: depth (10/18/34/50), stem_kernel (= stem stride), no_max_pool, weights (random or a path)."""

    def __init__(self, depth: int, stem_kernel: int, no_max_pool: bool, weights: str | None):
        super().__init__()
        factory = {10: nets.resnet10, 18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}[depth]
        self.net = factory(spatial_dims=3, n_input_channels=1, conv1_t_size=stem_kernel, conv1_t_stride=stem_kernel,
                           no_max_pool=no_max_pool, feed_forward=False)  # fmt: skip
        norms = [m for m in self.net.layer4.modules() if isinstance(m, nn.BatchNorm3d)]
        self.num_features = norms[-1].num_features  # 512 (basic blocks) or 2048 (bottlenecks)
        self.recipe = {"factory": f"{__name__}.ResNet3D", "depth": depth, "stem_kernel": stem_kernel,
                       "no_max_pool": no_max_pool}  # fmt: skip
        self.init_record = load_weights(self, weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.maxpool(net.act(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3, 4))


class ThreePlaneEncoder(nn.Module):
    """GreenRFM's MRI encoder: one 3D ResNet per plane (sagittal, coronal, axial), features averaged.

    ``forward``: (B, 3, 1, H, W, S) -> (B, num_features); ``forward_features`` is the same vector.
    Args: those of ``ResNet3D`` (each branch gets its own weights; ``weights``: random or a file of the
    whole three-branch encoder).
    """

    def __init__(self, depth: int, stem_kernel: int, no_max_pool: bool, weights: str | None):
        super().__init__()
        self.branches = nn.ModuleList(ResNet3D(depth, stem_kernel, no_max_pool, "random") for _ in range(3))
        self.num_features = self.branches[0].num_features
        self.recipe = {**self.branches[0].recipe, "factory": f"{__name__}.ThreePlaneEncoder"}
        self.init_record = load_weights(self, weights)

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(planes[:, i]) for i, branch in enumerate(self.branches)]).mean(0)

    def forward_features(self, planes: torch.Tensor) -> torch.Tensor:
        return self(planes)
