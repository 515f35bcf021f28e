"""Patch-level pieces of masked image modelling, shared by MAE and SparK.

Images (B, C, H, W) are cut into (H/p)(W/p) patches of p x p pixels, row-major; a patch is a vector of
p·p·C values in (row, column, channel) order.
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p·p·C), N = (H/p)(W/p)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, channels: int, height: int, width: int, patch: int) -> torch.Tensor:
    """(B, N, p·p·C) -> (B, C, H, W), the inverse of ``patchify``."""
    b = patches.shape[0]
    x = patches.reshape(b, height // patch, width // patch, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sqrt(var + 1e-6)) of each patch's values, (B, N, 1) each: MAE's ``norm_pix_loss``."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()


def normalised_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch to mean 0, std 1: (P - mean(P)) / sqrt(var(P) + 1e-6)."""
    mean, std = patch_statistics(patches)
    return (patches - mean) / std


def masked_patch_mse(prediction: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Σ_masked mean_values (prediction - target)² / #masked: prediction, target (B, N, V), masked (B, N)."""
    per_patch = (prediction - target).pow(2).mean(-1)
    masked = masked.to(per_patch.dtype)
    return (per_patch * masked).sum() / masked.sum()
