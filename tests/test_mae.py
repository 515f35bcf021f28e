"""Masked autoencoder (the efficiency study's RETFound-MEH-like baseline): patches, masking, the loss."""

from __future__ import annotations

import torch

from greenlab.config import build
from greenlab.objectives.mae import MaskedAutoencoder
from greenlab.objectives.patches import patchify

TINY_ENCODER = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def tiny_mae(**kwargs) -> MaskedAutoencoder:
    torch.manual_seed(0)
    vit = build("backbone/vit_large_patch16_mae", img_size=64, weights="random", model_kwargs=TINY_ENCODER)
    return build("objective/mae", backbone=vit, decoder_dim=32, decoder_depth=1, decoder_heads=2, **kwargs)


def test_patchify_orders_patches_row_major_with_pixels_inside():
    mae = tiny_mae()
    images = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).reshape(2, 3, 64, 64)
    patches = patchify(images, mae.patch_size)
    assert patches.shape == (2, 16, 16 * 16 * 3)
    row, col = 1, 2  # patch 6 = the second row of patches, third column
    expected = images[1, :, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 4 * row + col], expected)


def test_masking_hides_three_quarters_and_the_encoder_sees_only_the_rest():
    mae = tiny_mae()
    keep, mask = mae.random_masking(5, 16, torch.device("cpu"))
    assert keep.shape == (5, 4) and torch.equal(mask.sum(1), torch.full((5,), 12.0))
    assert torch.all(mask.gather(1, keep) == 0)
    latent = mae.encode_visible(torch.randn(5, 3, 64, 64), keep)
    assert latent.shape == (5, 1 + 4, 48)


def test_loss_counts_only_hidden_patches_and_training_lowers_it():
    mae = tiny_mae()
    images = torch.randn(4, 3, 64, 64)
    target = patchify(images, mae.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    keep, mask = mae.random_masking(4, 16, images.device)
    perfect_on_hidden = torch.where(mask.bool().unsqueeze(-1), target, torch.zeros_like(target))
    mae.random_masking = lambda *args: (keep, mask)
    mae.decode = lambda *args: perfect_on_hidden  # wrong on every visible patch: those must not count
    assert mae(images).item() < 1e-6

    mae = tiny_mae(base_lr=1e-3, batch_size=256, warmup_epochs=0)
    optimizer = mae.configure_optimizers()["optimizer"]
    torch.manual_seed(1)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = mae(images)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
