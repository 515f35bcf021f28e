"""Self-supervision in 3D: SparK on volumes with both sparse backends (the same function, float64), its masks on
the encoder's grid and its losses; Token Reconstruction's stem-cell corruption and per-volume noise on r3d_18;
MAE's 3D positions; the 3D augmentation of training volumes, and k-fold fine-tuning on volumes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai import transforms as mt
from omegaconf import OmegaConf
from torch import nn

from greenlab.config import CONFIG_DIR, build
from greenlab.data.transforms3d import volume_augmentation
from greenlab.objectives.patches import patchify, unpatchify
from greenlab.objectives.spark import masked_patch_loss, random_visible_mask
from greenlab.sparse import masked_dense, minkowski
from tests.conftest import write_npz_3d
from tests.helpers import TOL, assert_backends_agree


def small_3d_cnn() -> nn.Module:
    """What 3D encoders contain: a patchifying stem, BN3d, ReLU, max-pool, depthwise and strided 3x3x3 convs."""
    return nn.Sequential(
        nn.Conv3d(1, 8, 2, 2, 0, bias=False), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(3, 1, 1),
        nn.Conv3d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm3d(8), nn.SiLU(),
        nn.Conv3d(8, 16, 3, 2, 1), nn.Conv3d(16, 16, 1), nn.BatchNorm3d(16), nn.ReLU(),
    ).double()  # fmt: skip


def test_a_small_3d_cnn_computes_the_same_in_both_backends_on_an_anisotropic_grid():
    torch.manual_seed(0)
    net = small_3d_cnn()
    dense_masked, sparse = masked_dense.sparsify(copy.deepcopy(net)), minkowski.sparsify(copy.deepcopy(net))
    volumes = torch.randn(3, 1, 16, 12, 8, dtype=torch.float64)
    visible = random_visible_mask(3, (4, 3, 2), 0.6, "cpu")  # cells of 4 voxels
    with masked_dense.active_mask(visible):
        out_a = dense_masked(volumes * masked_dense.mask_at(volumes))
    out_b = minkowski.to_dense(sparse(minkowski.to_sparse(volumes, visible)), 3, 4, 3, 2)
    torch.testing.assert_close(out_a, out_b, **TOL)
    assert out_a[~visible.expand_as(out_a)].abs().max() == 0, "masked cells stay exactly zero"
    weights = torch.randn_like(out_a)
    (out_a * weights).sum().backward(), (out_b * weights).sum().backward()
    for (name, a), (_, b) in zip(dense_masked.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)


def spark_3d(backend: str, **arguments):
    torch.manual_seed(0)
    encoder = build("backbone/resnet3d18", depth=10, weights="random")
    return build("objective/spark", backbone=encoder, sparse_backend=backend, decoder_width=32, **arguments)


def test_spark_3d_on_r3d_backends_give_the_same_loss_and_every_gradient():
    objectives = [spark_3d(backend).double() for backend in ("masked_dense", "minkowski")]
    torch.manual_seed(1)
    volumes = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    visible = random_visible_mask(2, (2, 2, 2), 0.6, "cpu")
    assert_backends_agree(objectives, volumes, visible, min_gradients=30)


def test_spark_3d_masks_the_encoders_grid_and_decodes_with_3d_blocks():
    objective = spark_3d("masked_dense")
    assert objective.downsample == 16 and objective.encoder.strides == [
        2,
        4,
        8,
        16,
    ]  # r3d_18: stem 2, no max-pool
    assert len(objective.decoder) == 4 and isinstance(objective.decoder[0].up, nn.ConvTranspose3d)
    assert objective.to_pixels.out_channels == 1
    volumes = torch.randn(3, 1, 32, 48, 16)
    with pytest.raises(ValueError, match="multiples of its total stride 16"):
        objective.training_step((torch.randn(2, 1, 40, 32, 32), None), 0)
    visible = random_visible_mask(3, (2, 3, 1), 0.6, "cpu")
    assert (visible.flatten(1).sum(1) == round(6 * 0.4)).all()
    perfect = torch.randn_like(volumes)  # wrong on visible patches only: the loss ignores them
    target = patchify(volumes, 16)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    hidden = ~visible.flatten(1)
    prediction = unpatchify(torch.where(hidden[..., None], target, patchify(perfect, 16)), 1, 32, 48, 16, 16)
    assert masked_patch_loss(prediction, volumes, visible).item() < 1e-10


def test_spark_3d_training_lowers_the_loss_and_draws_mid_slices(tmp_path):
    objective = spark_3d(
        "masked_dense", base_lr=1e-2, warmup_epochs=0, optimizer="adamw", figure_dir=str(tmp_path)
    )
    objective.effective_batch_size = 256
    optimizer = objective.configure_optimizers()["optimizer"]
    torch.manual_seed(2)
    volumes = torch.randn(4, 1, 32, 32, 32).cumsum(2) / 8  # smooth along one axis: learnable from context
    visible = random_visible_mask(4, (2, 2, 2), 0.6, "cpu")
    losses = []
    for _ in range(16):
        optimizer.zero_grad()
        loss, prediction = objective.train()(volumes, visible)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    objective.hparams.figure_every_n_epochs = 1
    path = objective.save_reconstruction(volumes, visible, prediction.detach(), rows=2)
    assert path.is_file() and path.stat().st_size > 1000


def test_token_reconstruction_3d_corrupts_r3d_stem_cells_and_keeps_the_last_volume_clean():
    torch.manual_seed(0)
    encoder = build("backbone/resnet3d18", depth=10, stem_kernel=4, weights="random")
    objective = build("objective/token_reconstruction", backbone=encoder).eval()
    volumes = torch.randn(2, 1, 32, 32, 32)
    assert objective.corruption_cells(volumes) == 8**3 and objective.corruption_token.shape == (64,)
    tokens = objective.student_tokens(volumes)
    assert tokens.shape == (2, 1, 512)  # one position of the /32 map (lite stem), 512 channels
    seen = {}  # what layer1 receives: the stem's output, clean then corrupted
    encoder.net.layer1.register_forward_pre_hook(lambda module, inputs: seen.update({len(seen): inputs[0]}))
    corrupt = objective.corruption_mask(2, 8**3, volumes.device)
    objective.student_tokens(volumes), objective.student_tokens(volumes, corrupt)
    cells = corrupt.view(2, 1, 8, 8, 8).expand_as(seen[0])
    assert corrupt[0].any() and not corrupt[-1].any()
    assert seen[1][cells].abs().max() == 0 and torch.equal(seen[1][~cells], seen[0][~cells])
    noisy = objective.add_pixel_noise(volumes)
    assert torch.equal(noisy[-1], volumes[-1])
    ratio = (noisy[0] - volumes[0]).std() / volumes[0].std()
    assert 0.15 < ratio < 0.25  # 0.2 x the volume's own std
    with pytest.raises(ValueError, match="takes 3D volumes"):
        objective(torch.randn(2, 1, 32, 32))


def tiny_mae_3d():
    torch.manual_seed(0)
    vit = build("backbone/vit3d", volume_size=[32, 32, 16], embed_dim=48, depth=2, num_heads=2)
    return build("objective/mae", backbone=vit, decoder_dim=36, decoder_depth=1, decoder_heads=2)


def test_mae_3d_positions_are_monais_3d_sincos_and_the_encoder_is_the_vits():
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    from greenlab.objectives.mae import mae_sincos_pos_embed

    torch.testing.assert_close(
        mae_sincos_pos_embed(48, (4, 3, 2)), build_sincos_position_embedding([4, 3, 2], 48, 3)[0]
    )
    mae = tiny_mae_3d().eval()
    table = mae.encoder.pos_embed[0]
    assert torch.equal(table[0], torch.zeros(48)) and not table.requires_grad  # [CLS] row zero, fixed
    torch.testing.assert_close(table[1:], mae_sincos_pos_embed(48, (2, 2, 1)))
    volumes = torch.randn(2, 1, 32, 32, 16)
    torch.testing.assert_close(
        mae.encode_visible(volumes, torch.arange(4).expand(2, -1)), mae.encoder.forward_features(volumes)
    )
    keep, mask = mae.random_masking(2, 4, volumes.device)
    assert keep.shape == (2, 1) and mask.sum(1).tolist() == [3.0, 3.0]  # 0.75 of 4 patches hidden
    assert mae.decoder_pred.out_features == 16**3  # one channel, 16^3 voxels per patch


def test_mae_3d_training_lowers_the_loss():
    mae = tiny_mae_3d()
    mae.effective_batch_size = 256
    optimizer = mae.configure_optimizers()["optimizer"]
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    torch.manual_seed(1)
    volumes = torch.randn(4, 1, 32, 32, 16).cumsum(2) / 8
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = mae.train()(volumes)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.92 * sum(losses[:3]) / 3, losses  # measured: 0.876
    with pytest.raises(ValueError, match="takes 3D volumes"):
        mae(torch.randn(2, 1, 32, 32))


LIGHT = dict(OmegaConf.load(CONFIG_DIR / "data" / "volume_augmentation" / "light.yaml"))


def test_volume_augmentation_keeps_the_shape_changes_the_volume_and_replays_under_a_seed():
    chain = mt.Compose(volume_augmentation(**LIGHT))
    volume = torch.rand(1, 16, 12, 8)
    draws = []
    for seed in (0, 0, 1):
        chain.set_random_state(seed)
        draws.append(chain({"image": volume})["image"])
    assert all(d.shape == volume.shape for d in draws)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.allclose(draws[0], volume)
    with pytest.raises(ValueError, match="crop_scale"):
        volume_augmentation(**{**LIGHT, "crop_scale": [0.0, 1.0]})


def test_medmnist_volumes_are_resized_cropped_and_augmented_for_training_only(tmp_path):
    write_npz_3d(tmp_path / "v.npz", size=16)
    data = build("data/medmnist", path=str(tmp_path / "v.npz"), volume_size=[12, 12, 12], crop_size=[8, 8, 8],
                 volume_augmentation=LIGHT, num_workers=0)  # fmt: skip
    data.setup()
    stored = (
        torch.as_tensor(np.load(tmp_path / "v.npz")["train_images"][0], dtype=torch.float32)[None, None] / 255
    )
    resized = torch.nn.functional.interpolate(
        stored, size=(12, 12, 12), mode="trilinear", align_corners=False
    )[0]
    assert torch.allclose(
        data.probe_train_set[0][0], resized[:, 2:10, 2:10, 2:10]
    )  # the centre crop, unaugmented
    first, second = data.pretrain_set[0][0], data.pretrain_set[0][0]
    assert first.shape == (1, 8, 8, 8) and not torch.equal(first, second)  # a new draw each time
    described = data.describe()
    assert described["volume_augmentation"] == LIGHT and described["crop_size"] == [8, 8, 8]


def test_kfold_finetuning_trains_a_3d_encoder_on_volumes(tmp_path):
    write_npz_3d(tmp_path / "v.npz", size=16)
    data = build("data/medmnist", path=str(tmp_path / "v.npz"), volume_augmentation=LIGHT, num_workers=0)
    data.setup()
    evaluation = build("evaluation/finetune", folds=2, epochs=1, batch_size=4, warmup_epochs=0, num_workers=0)
    backbone = build("backbone/resnet3d18", depth=10, stem_kernel=4, weights="random")
    metrics = evaluation(backbone, data, torch.device("cpu")).metrics
    assert [f["n_test"] for f in metrics["finetune_folds"]] == [10, 10]  # 12 + 8 labelled volumes, two folds
    assert 0 <= metrics["finetune_auroc_mean"] <= 1
