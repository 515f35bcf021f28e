"""Embeddings of a frozen backbone: token pooling and a timed, batched pass over a loader."""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

POOLINGS = ("mean_all", "mean_patch", "cls", "cls_mean_patch", "fc_norm_mean_patch")


def pool(features: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """One vector per image from backbone features.

    features: (B, T, D) tokens ([CLS], registers, then patches), (B, C, H, W[, D]) CNN maps (averaged),
    or (B, E) vectors (kept).
    pooling: ``mean_all`` mean of all T tokens (RETFound-Green's code); ``mean_patch`` mean of patch tokens
    (timm ``global_pool='avg'``); ``cls`` the [CLS] token; ``cls_mean_patch`` both, concatenated (2D);
    ``fc_norm_mean_patch`` the MAE / RETFound-MEH global-pool feature: LayerNorm (eps 1e-6, the fine-tuning
    model's fc_norm, untrained: no affine) of the mean patch token, taken before the final norm
    (``features_for`` gives those tokens).
    """
    if features.ndim == 2:  # already one vector per image (e.g. an image-text model's latent)
        return features
    if features.ndim >= 4:  # CNN maps, 2D or 3D
        return features.flatten(2).mean(-1)
    if pooling == "mean_all":
        return features.mean(1)
    if pooling == "mean_patch":
        return features[:, num_prefix_tokens:].mean(1)
    if pooling == "cls":
        return features[:, 0]
    if pooling == "fc_norm_mean_patch":
        mean = features[:, num_prefix_tokens:].mean(1)
        return torch.nn.functional.layer_norm(mean, mean.shape[-1:], eps=1e-6)
    if pooling == "cls_mean_patch":
        return torch.cat([features[:, 0], features[:, num_prefix_tokens:].mean(1)], dim=-1)
    raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")


def features_for(backbone: nn.Module, images: torch.Tensor, pooling: str) -> torch.Tensor:
    """``backbone.forward_features``; for ``fc_norm_mean_patch`` a timm ViT's tokens before its final norm."""
    if pooling != "fc_norm_mean_patch":
        return backbone.forward_features(images)
    vit = backbone
    return vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images)))))


@torch.no_grad()
def embed(
    backbone: nn.Module,
    loader: DataLoader,
    pooling: str,
    device: torch.device,
    bf16: bool = False,
    desc: str = "embedding",
    on_batch=None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(embeddings (N, E) float32, labels (N, T) int64, seconds spent in the backbone forward); ``on_batch(i,
    vectors, labels)``, when given, receives each batch's as it is computed (``greenlab.embed`` saves them).

    The time excludes data loading; it is synchronised on CUDA so it measures the model alone.
    """
    was_training = backbone.training
    backbone.eval().to(device)
    prefix = getattr(backbone, "num_prefix_tokens", 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    vectors, labels, seconds = [], [], 0.0
    for images, batch_labels in tqdm(loader, desc=desc, unit="batch"):
        images = images.to(device, non_blocking=True)
        _sync(device)
        start = time.perf_counter()
        with autocast:
            features = features_for(backbone, images, pooling)
        vector = pool(features, pooling, prefix).float()
        _sync(device)
        seconds += time.perf_counter() - start
        vectors.append(vector.cpu().numpy())
        labels.append(batch_labels.numpy())
        if on_batch is not None:
            on_batch(len(vectors) - 1, vectors[-1], labels[-1])
    backbone.train(was_training)
    return np.concatenate(vectors), np.concatenate(labels), seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
