"""A Vision Transformer for volumes: cubic patches, timm's transformer blocks, MAE's layout (one [CLS] token
inside the position table). timm has no 3D ViT; this one has the members of timm's ``VisionTransformer`` that
greenlab's objectives read (``patch_embed`` with ``proj`` / ``patch_size`` / ``grid_size`` / ``num_patches``,
``cls_token``, ``reg_token``, ``pos_embed``, ``no_embed_class``, ``num_prefix_tokens``, ``_pos_embed``,
``patch_drop``, ``norm_pre``, ``blocks``, ``norm``), so MAE and Token Reconstruction run on it unchanged.

``forward_features``: (B, C, X, Y, Z) -> (B, 1 + N, D) tokens, N = (X/p)(Y/p)(Z/p), patches row-major;
``forward``: the [CLS] token (B, D).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from greenlab.backbones.weights import load_exactly, resolve_weights

HINT = "Give backbone.weights=/path/to/a 3D ViT state dict (a backbone.pth of an mae_3d run)."


class PatchEmbed3D(nn.Module):
    """Cubic patches: Conv3d(k = stride = p) -> (B, N, D)."""

    def __init__(self, volume_size: tuple[int, int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if any(side % patch_size for side in volume_size):
            raise ValueError(f"volume_size {tuple(volume_size)} is not a multiple of patch_size {patch_size}")
        self.patch_size = (patch_size,) * 3
        self.grid_size = tuple(side // patch_size for side in volume_size)
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.proj(volumes).flatten(2).transpose(1, 2)


class VisionTransformer3D(nn.Module):
    """Args: volume_size (voxels per axis, multiples of patch_size), patch_size, in_chans, embed_dim, depth,
    num_heads, mlp_ratio; weights: ``random`` | a path to a state dict of this model. Initialised as timm's
    ViT (truncated-normal position table and tokens, std 0.02); MAE replaces that with its own init."""

    def __init__(self, volume_size: list[int], patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, weights: str):  # fmt: skip
        super().__init__()
        self.patch_embed = PatchEmbed3D(tuple(volume_size), patch_size, in_chans, embed_dim)
        self.embed_dim = self.num_features = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = None
        self.num_prefix_tokens, self.no_embed_class = 1, False
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.patch_drop = self.norm_pre = nn.Identity()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        )
        self.norm = norm(embed_dim)
        for tensor in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(tensor, std=0.02)
        self.recipe = {"factory": f"{__name__}.VisionTransformer3D", "volume_size": list(volume_size),
                       "patch_size": patch_size, "in_chans": in_chans, "embed_dim": embed_dim, "depth": depth,
                       "num_heads": num_heads, "mlp_ratio": mlp_ratio}  # fmt: skip
        state, self.init_record = resolve_weights(weights, None, "3D ViT", HINT)
        if state is not None:
            load_exactly(self, state, self.init_record["source"])

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """[CLS] + patch tokens, plus the position table (timm's ``_pos_embed`` for this layout)."""
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, volumes: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(volumes))))
        return self.norm(self.blocks(x))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.forward_features(volumes)[:, 0]
