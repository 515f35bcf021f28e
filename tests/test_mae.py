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

    mae = tiny_mae(base_lr=1e-3, warmup_epochs=0)
    mae.effective_batch_size = (
        256  # what fit's setup sets from the trainer (test_lr_rule_uses_the_global_batch)
    )
    optimizer = mae.configure_optimizers()["optimizer"]
    torch.manual_seed(1)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = mae(images)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # random pixels, fixed sin-cos positions and MAE's xavier init (the official ones): it memorises slowly
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses


def test_position_embeddings_are_maes_fixed_sincos_and_the_init_is_maes():
    """facebookresearch/mae (RETFound_MAE): get_2d_sincos_pos_embed, requires_grad=False, [CLS] row zero;
    xavier-uniform linear layers; LayerNorm eps 1e-6."""
    import math

    from greenlab.objectives.mae import mae_sincos_pos_embed

    mae = tiny_mae()
    table = mae_sincos_pos_embed(8, (2, 3))  # 2 rows x 3 columns, dim 8: [sin, cos](column), [sin, cos](row)
    omega = [1.0, 0.01]
    column, row = 2, 1  # patch 5
    expected = [math.sin(column * o) for o in omega] + [math.cos(column * o) for o in omega]
    expected += [math.sin(row * o) for o in omega] + [math.cos(row * o) for o in omega]
    assert torch.allclose(table[5], torch.tensor(expected), atol=1e-6)
    pos = mae.encoder.pos_embed
    assert not pos.requires_grad and torch.equal(pos[0, 0], torch.zeros(48))
    assert torch.allclose(pos[0, 1:], mae_sincos_pos_embed(48, (4, 4)))
    assert torch.equal(mae.decoder_pos_embed[0], mae_sincos_pos_embed(32, (4, 4)))
    bound = math.sqrt(6 / (32 + 48))  # xavier-uniform of decoder_embed (48 -> 32)
    assert mae.decoder_embed.weight.abs().max() <= bound and mae.decoder_embed.bias.abs().sum() == 0
    assert mae.decoder_norm.eps == 1e-6 and mae.decoder_blocks[0].norm1.eps == 1e-6


def test_embedding_is_the_official_global_pool_feature():
    """RETFound-MEH's feature: fc_norm (LayerNorm, eps 1e-6) of the mean patch token before the final norm."""
    from greenlab.evaluation.embeddings import features_for, pool

    vit = tiny_mae().encoder.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.blocks(vit._pos_embed(vit.patch_embed(images)))
        expected = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (48,), eps=1e-6)
        got = pool(features_for(vit, images, "fc_norm_mean_patch"), "fc_norm_mean_patch", 1)
    torch.testing.assert_close(got, expected)
