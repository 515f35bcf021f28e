"""The two sparse backends compute the same function: forward and gradients, float64, same weights."""

import copy

import pytest
import timm
import torch
from torch import nn

from greenlab.config import build
from greenlab.objectives.patches import patchify, unpatchify
from greenlab.objectives.spark import masked_patch_loss, random_visible_mask
from greenlab.sparse import masked_dense, minkowski

TOL = {"rtol": 1e-9, "atol": 1e-9}  # float64: the backends differ by round-off only (~1e-13 measured)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
    ).double()  # fmt: skip


def both_backends(model: nn.Module):
    return masked_dense.sparsify(copy.deepcopy(model)), minkowski.sparsify(copy.deepcopy(model))


@pytest.mark.parametrize("training", [True, False])
def test_small_cnn_forward_and_gradients_match(training):
    torch.manual_seed(0)
    dense_masked, sparse = both_backends(small_cnn())
    dense_masked.train(training), sparse.train(training)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    visible = random_visible_mask(3, (4, 4), 0.6, "cpu")  # mask cells of 8 px on this 32 px input
    with masked_dense.active_mask(visible):
        out_a = dense_masked(images * masked_dense.mask_at(images))
    out_b = minkowski.to_dense(sparse(minkowski.to_sparse(images, visible)), 3, 8, 8)
    torch.testing.assert_close(out_a, out_b, **TOL)
    hidden = ~visible.repeat_interleave(2, -2).repeat_interleave(2, -1).expand_as(out_a)
    assert out_a[hidden].abs().max() == 0, "masked positions stay exactly zero"
    weights = torch.randn_like(out_a)
    (out_a * weights).sum().backward(), (out_b * weights).sum().backward()
    for (name, a), (_, b) in zip(dense_masked.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)


@pytest.mark.parametrize("model_name", ["rexnet_100", "rexnet_300"])  # width 1.0, and nn-MobileNet's 3.0
def test_spark_on_nn_mobilenet_backends_match_loss_and_every_gradient(model_name):
    objectives = []
    for backend in ("masked_dense", "minkowski"):
        torch.manual_seed(0)
        backbone = build("backbone/nn_mobilenet", model_name=model_name, spatial_dropout=0.0)
        objectives.append(
            build("objective/spark", backbone=backbone, sparse_backend=backend, decoder_width=32)
            .double()
            .train()
        )
    torch.manual_seed(1)
    images = torch.randn(4, 3, 96, 96, dtype=torch.float64)
    visible = random_visible_mask(4, (3, 3), 0.6, "cpu")
    with masked_dense.active_mask(visible):  # the five encoder maps, dense, zero where masked
        maps = [objective.encode(images, visible) for objective in objectives]
    assert [m.shape[1] for m in maps[0]] == list(objectives[0].encoder.channels)
    for map_a, map_b in zip(*maps):
        torch.testing.assert_close(map_a, map_b, **TOL)
    losses = []
    for objective in objectives:
        loss, _ = objective(images, visible)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    grads = [{n: p.grad for n, p in o.named_parameters()} for o in objectives]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **TOL, msg=name)


def test_sparsified_weights_keep_dense_names_and_load_into_timm():
    backbone = build("backbone/nn_mobilenet", model_name="rexnet_100")
    names = list(backbone.state_dict())
    objective = build("objective/spark", backbone=backbone, sparse_backend="minkowski", decoder_width=32)
    dense = objective.trained_backbone()
    assert list(dense.state_dict()) == names
    assert not any(hasattr(type(m), "dense_class") for m in dense.modules()), "a plain dense network again"
    timm.create_model("rexnet_100", num_classes=0).load_state_dict(dense.state_dict())  # strict
    out = dense.eval().forward_features(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1280, 2, 2)


def test_mask_has_exact_visible_count_and_loss_ignores_visible_patches():
    visible = random_visible_mask(8, (7, 7), 0.6, "cpu")
    assert visible.shape == (8, 1, 7, 7) and (visible.flatten(1).sum(1) == 20).all()  # round(49 * 0.4)
    images = torch.randn(8, 3, 224, 224)
    prediction = torch.randn(8, 3, 224, 224)
    full = visible.repeat_interleave(32, -2).repeat_interleave(32, -1)
    changed = torch.where(full, prediction + 100.0, prediction)  # change only visible patches
    assert masked_patch_loss(changed, images, visible) == masked_patch_loss(prediction, images, visible)
    assert torch.equal(unpatchify(patchify(images, 32), 3, 224, 224, 32), images)


def test_perfect_prediction_of_normalised_patches_has_zero_loss():
    images = torch.rand(2, 3, 64, 64)
    target = patchify(images, 32)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    visible = torch.tensor([True, False, False, True]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    assert masked_patch_loss(unpatchify(normed, 3, 64, 64, 32), images, visible).item() < 1e-10


def test_spark_decoder_width_and_weight_decay_groups_as_sparks_code():
    """SparK: decoder width 768; mask tokens, biases and norms are not decayed."""
    backbone = build("backbone/nn_mobilenet", model_name="rexnet_100")
    objective = build("objective/spark", backbone=backbone, sparse_backend="masked_dense")
    assert objective.decoder[0].up.in_channels == 768
    objective.effective_batch_size = 32  # set by fit's setup from the trainer
    decayed, undecayed = objective.configure_optimizers()["optimizer"].param_groups[:2]
    assert all(p.ndim > 1 for p in decayed["params"]) and decayed["weight_decay"] == 0.04
    assert {id(d.mask_token) for d in objective.densify} <= {id(p) for p in undecayed["params"]}


def test_spatial_dropout_follows_each_blocks_output_as_nn_mobilenet():
    """nn-MobileNet's model/resnext.py: Dropout2d on each LinearBottleneck's output, after the residual add;
    p = main.py's --drop_path 0.3."""
    from timm.models.rexnet import LinearBottleneck

    default = build("backbone/nn_mobilenet", model_name="rexnet_100")
    blocks = [b for b in default.features if isinstance(b, LinearBottleneck)]
    assert len(blocks) == 16 and all(b.spatial_dropout.p == 0.3 for b in blocks)
    full = build("backbone/nn_mobilenet", model_name="rexnet_100", spatial_dropout=1.0)
    block = next(b for b in full.features if isinstance(b, LinearBottleneck) and b.use_shortcut)
    x = torch.randn(2, block.in_channels, 8, 8)
    assert torch.count_nonzero(block.train()(x)) == 0, "dropped after the residual: nothing passes"
    assert torch.count_nonzero(block.eval()(x)) > 0


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_masked_batch_norm_equals_batch_norm_on_the_active_rows(training, momentum):
    """The sync-free masked sums give what BatchNorm over the gathered active rows gives: output, gradients
    and running statistics (two steps, so the running update is exercised)."""
    torch.manual_seed(0)
    bn_rows = nn.BatchNorm2d(6, momentum=momentum).double()
    with torch.no_grad():
        bn_rows.weight.uniform_(0.5, 1.5), bn_rows.bias.uniform_(-1, 1)
        bn_rows.running_mean.uniform_(-1, 1), bn_rows.running_var.uniform_(0.5, 2)
    bn_masked = copy.deepcopy(bn_rows)
    bn_rows.train(training), bn_masked.train(training)
    for _ in range(2):
        x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
        mask = random_visible_mask(3, (4, 4), 0.6, "cpu").repeat_interleave(2, -2).repeat_interleave(2, -1)
        x_rows, x_masked = x.clone().requires_grad_(), x.clone().requires_grad_()
        rows = masked_dense.batch_norm_rows(bn_rows, x_rows.permute(0, 2, 3, 1)[mask[:, 0]])
        out = masked_dense.masked_batch_norm(bn_masked, x_masked, mask)
        torch.testing.assert_close(out.permute(0, 2, 3, 1)[mask[:, 0]], rows, **TOL)
        assert out.permute(0, 2, 3, 1)[~mask[:, 0]].abs().max() == 0
        weights = torch.randn_like(rows)
        (rows * weights).sum().backward()
        (out.permute(0, 2, 3, 1)[mask[:, 0]] * weights).sum().backward()
        torch.testing.assert_close(x_masked.grad, x_rows.grad, **TOL)
        torch.testing.assert_close(bn_masked.weight.grad, bn_rows.weight.grad, **TOL)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn_masked, name), getattr(bn_rows, name), **TOL, msg=name)


def test_minkowski_kernels_report_their_flops_to_the_count():
    """torch's FlopCounterMode cannot see MinkowskiEngine's convolutions: they report 2 FLOPs per multiply-add
    over their kernel map's pairs, x 3 (forward, input and weight gradients). A 3x3 conv on a fully visible 4x4
    grid has sum over offsets of (4 - |dy|)(4 - |dx|) = 10^2 = 100 pairs."""
    from greenlab.sparse import counting_sparse_flops

    conv = minkowski.sparsify(nn.Sequential(nn.Conv2d(3, 5, 3, 1, 1, bias=False)))
    images, visible = torch.randn(1, 3, 4, 4), torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with counting_sparse_flops() as counted:
        conv(minkowski.to_sparse(images, visible))
        assert counted() == 3 * 2 * 100 * 3 * 5
    conv(minkowski.to_sparse(images, visible))  # no count open: nothing is looked up or added
