"""Patch-level pieces of masked image modelling, shared by MAE and SparK.

Images (B, C, H, W) are cut into (H/p)(W/p) patches of p x p pixels, row-major; a patch is a vector of
p·p·C values in (row, column, channel) order. Volumes (B, C, D, H, W) likewise into p x p x p patches.
"""

from __future__ import annotations

import math

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, *S) -> (B, N, p^D·C), N = Π S_i / p: patches row-major, values (p, .., p, C) inside."""
    b, c, *sizes = images.shape
    grid = [n // patch for n in sizes]
    x = images.reshape(b, c, *[v for g in grid for v in (g, patch)])
    d = len(sizes)
    order = [0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1]  # b, grid..., within..., c
    return x.permute(*order).reshape(b, math.prod(grid), patch**d * c)


def unpatchify(patches: torch.Tensor, channels: int, *sizes: int) -> torch.Tensor:
    """(B, N, p^D·C) -> (B, C, *S), the inverse of ``patchify``: ``unpatchify(x, C, *S, p)``."""
    *sizes, patch = sizes
    b, d = patches.shape[0], len(sizes)
    grid = [n // patch for n in sizes]
    x = patches.reshape(b, *grid, *[patch] * d, channels)
    order = [
        0,
        2 * d + 1,
        *[v for i in range(d) for v in (1 + i, 1 + d + i)],
    ]  # b, c, (g1, p1), (g2, p2), ...
    return x.permute(*order).reshape(b, channels, *sizes)


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
