"""The 2D backbone x objective grid: every fitting pair runs through the command line, every unfit one is
refused in one line; docs/grid.md's table is the declarations'; SparK on a ResNet and a ConvNeXt gives the same
loss and gradients with both sparse backends; MAE takes every timm prefix layout; Token Reconstruction on a CNN
corrupts its stem cells."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch

from greenlab import contracts
from greenlab.analysis import grid
from greenlab.config import build
from greenlab.objectives.spark import random_visible_mask
from tests.conftest import REPO, TINY_DATA, run_cli
from tests.helpers import assert_backends_agree

# its module-scoped runs are made once: `make test` (pytest-xdist --dist loadgroup) keeps the file on one worker
pytestmark = pytest.mark.xdist_group("grid")

GRID_CONF = (
    REPO / "tests" / "grid_conf"
)  # tiny versions of each 2D backbone family, reached by Hydra's search path
TINY_BACKBONES = ("tiny_vit_reg4", "tiny_vit_mae", "tiny_resnet50", "tiny_convnext", "tiny_nn_mobilenet",
                  "tiny_timm_resnet18")  # fmt: skip
SELF_SUPERVISED = ("token_reconstruction", "mae", "spark")
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [4, 8, 16, 32], "drop_path_rate": 0.0}
TINY_CONVNEXT = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "drop_path_rate": 0.0}


def fits(objective: str, backbone: str) -> bool:
    """From the declarations: the objective's ``needs`` against the tiny backbone's capabilities."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from greenlab.config import CONFIG_DIR

    needs = get_class(OmegaConf.load(CONFIG_DIR / "objective" / f"{objective}.yaml")._target_).needs
    with torch.device("meta"):
        model = build(
            f"backbone/{backbone}", overrides=[f"hydra.searchpath=[file://{GRID_CONF}]", "img_size=64"]
        )
    return not contracts.unmet(needs, contracts.capabilities(model))


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, data_dir):
    """One `-m` sweep of the three self-supervised objectives x the six tiny backbones, one step each."""
    sweep = tmp_path_factory.mktemp("grid")
    proc = run_cli("-m", "+experiment=grid", f"objective={','.join(SELF_SUPERVISED)}",
                   f"backbone={','.join(TINY_BACKBONES)}", f"hydra.searchpath=[file://{GRID_CONF}]", *TINY_DATA,
                   "trainer.fast_dev_run=true", "evaluation.bootstrap_resamples=10", "evaluation.ci_resamples=10",
                   f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}")  # fmt: skip
    choices = {}  # job folder -> (objective, backbone) as given on the command line
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        text = overrides.read_text()
        choices[overrides.parent.parent.name] = tuple(
            re.search(rf"- {group}=(\w+)", text).group(1) for group in ("objective", "backbone")
        )
    return sweep, proc.stderr, choices


@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("objective", SELF_SUPERVISED)
def test_every_fitting_pair_runs_and_every_other_is_refused_in_one_line(grid_sweep, objective, backbone):
    sweep, stderr, choices = grid_sweep
    job = next(folder for folder, pair in choices.items() if pair == (objective, backbone))
    results = sweep / job / "results.json"
    refusal = f"greenlab: refused (this job of the sweep is skipped): objective {objective} needs"
    refused_lines = [
        line for line in stderr.splitlines() if line.startswith(refusal) and f"backbone {backbone} is" in line
    ]
    if fits(objective, backbone):
        assert results.is_file() and not refused_lines
        data = json.loads(results.read_text())
        assert 0 <= data["metrics"]["probe_auroc_macro"] <= 1
        assert data["compute"]["train_images_seen"] > 0 and data["compute"]["train_flops_per_image"] > 0
    else:
        assert not results.exists() and len(refused_lines) == 1, stderr[-3000:]


def test_the_sweep_runs_twelve_pairs_and_refuses_six(grid_sweep):
    sweep, stderr, _ = grid_sweep
    assert (
        len(list(sweep.glob("*/results.json"))) == 6 + 2 + 4
    )  # TR on all six, MAE on the ViTs, SparK on the CNNs
    assert stderr.count("greenlab: refused (this job of the sweep is skipped)") == 4 + 2
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("objective", "backbone", "needed", "offered"),
    [  # one per kind of refusal: no token sequence (2D, 3D), no position table, no hierarchy (ViT, CNN, 3D)
        ("mae", ("nn_mobilenet", {"model_name": "rexnet_100"}), "a token sequence", "a 2D CNN feature hierarchy"),
        ("mae", ("vit_large_patch16_mae", {"img_size": 32, "weights": "random",
                                           "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2,
                                                            "pos_embed": "none"}}),
         "a position embedding table over the patch grid", "a 2D token sequence"),
        ("spark", ("vit_small_reg4_dinov2", {"img_size": 28, "weights": "random",
                                             "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}),
         "a CNN feature hierarchy", "a 2D token sequence"),
        ("spark", ("timm", {"model_name": "resnet18", "model_kwargs": {"output_stride": 16}}),
         "a CNN feature hierarchy in powers of two up to stride 32", "a 2D CNN feature map"),
        ("mae", ("resnet3d18", {"depth": 10, "weights": "random"}), "a token sequence", "a 3D CNN feature hierarchy"),
        ("spark", ("three_plane_resnet3d18", {"depth": 10, "weights": "random"}), "a CNN feature hierarchy",
         "a 3D network with pooled features only"),
    ],
)  # fmt: skip
def test_an_unfit_backbone_is_refused_naming_both_and_what_is_missing(objective, backbone, needed, offered):
    name, arguments = backbone
    with pytest.raises(contracts.UnfitBackbone) as refused:
        build(f"objective/{objective}", backbone=build(f"backbone/{name}", **arguments))
    assert needed in refused.value.needed and refused.value.offered.startswith(offered)


def test_the_grid_in_the_docs_is_the_declarations():
    assert grid.generated_part(REPO / "docs" / "grid.md") == grid.markdown(), (
        "docs/grid.md is out of date: paste `python -m greenlab.analysis.grid` between its markers"
    )


# --- SparK on timm CNNs
def spark_pair(backbone: str, model_kwargs: dict) -> list:
    objectives = []
    for backend in ("masked_dense", "minkowski"):
        torch.manual_seed(0)
        cnn = build(f"backbone/{backbone}", img_size=64, model_kwargs=model_kwargs)
        objectives.append(
            build("objective/spark", backbone=cnn, sparse_backend=backend, decoder_width=32).double()
        )
    return objectives


@pytest.mark.parametrize(
    ("backbone", "model_kwargs"), [("resnet50", TINY_RESNET), ("convnext_tiny", TINY_CONVNEXT)]
)
def test_spark_backends_give_the_same_loss_and_every_gradient(backbone, model_kwargs):
    """ResNet-50's bottlenecks (strided 1x1 shortcut, max-pool after ReLU) and ConvNeXt's blocks (7x7 depthwise,
    patchifying stem and downsampling, LayerNorms, layer scale), float64."""
    objectives = spark_pair(backbone, model_kwargs)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    visible = random_visible_mask(3, (2, 2), 0.6, "cpu")
    assert_backends_agree(objectives, images, visible, min_gradients=40)


def test_spark_on_resnet50_is_sparks_decoder_and_its_encoder_loads_into_timm_strictly():
    objective = build(
        "objective/spark", backbone=build("backbone/resnet50", img_size=64), sparse_backend="minkowski"
    )
    assert objective.encoder.strides == [4, 8, 16, 32] and objective.encoder.channels == [
        256,
        512,
        1024,
        2048,
    ]
    assert len(objective.decoder) == 5, "LightDecoder: log2(32) upsampling blocks, the last without a map"
    assert [d.proj.out_channels for d in objective.densify] == [768, 384, 192, 96]
    drop_paths = [m.drop_prob for m in objective.encoder.modules() if isinstance(m, timm.layers.DropPath)]
    assert objective.hparams.densify_norm == "bn" and max(drop_paths) == 0.05  # SparK's resnet50 default
    timm.create_model("resnet50", num_classes=0).load_state_dict(objective.trained_backbone().state_dict())


def test_spark_on_convnext_densifies_with_layernorm_and_keeps_the_deepest_width():
    """SparK: ``ln`` for ConvNeXt; an identity projection where the deepest map already has the decoder width."""
    objective = build(
        "objective/spark",
        backbone=build("backbone/convnext_tiny", img_size=64),
        sparse_backend="masked_dense",
    )
    assert objective.hparams.densify_norm == "ln"
    assert isinstance(objective.densify[0].proj, torch.nn.Identity)  # 768 channels = decoder width 768
    timm.create_model("convnext_tiny", num_classes=0).load_state_dict(
        objective.trained_backbone().state_dict()
    )


# --- MAE on timm ViT layouts
@pytest.mark.parametrize(
    ("backbone", "img_size", "layout", "prefix", "rows"),
    [("vit_large_patch16_mae", 32, {}, 1, 1),  # MAE's: [CLS] in the table
     ("vit_large_patch16_mae", 32, {"no_embed_class": True}, 1, 0),  # [CLS] outside the table
     ("vit_small_reg4_dinov2", 28, {}, 5, 0),  # DINOv2: [CLS] + 4 registers outside
     ("vit_large_patch16_mae", 32, {"reg_tokens": 2}, 3, 3),  # [CLS] + registers inside
     ("vit_large_patch16_mae", 32, {"class_token": False, "global_pool": "avg"}, 0, 0)],  # no prefix
)  # fmt: skip
def test_mae_keeps_every_prefix_layout_unmasked_with_timms_positions(
    backbone, img_size, layout, prefix, rows
):
    vit = build(f"backbone/{backbone}", img_size=img_size, weights="random",
                model_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2, **layout})  # fmt: skip
    mae = build("objective/mae", backbone=vit, decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    assert (mae.num_prefix, mae.prefix_rows) == (prefix, rows)
    images = torch.randn(2, 3, img_size, img_size)
    every_patch = torch.arange(4).expand(2, -1)
    torch.testing.assert_close(mae.encode_visible(images, every_patch), vit.forward_features(images))
    keep, _ = mae.random_masking(2, 4, images.device)
    assert mae.encode_visible(images, keep).shape == (2, prefix + 1, 48), "the prefix is never masked"
    table = vit.pos_embed[0]
    assert torch.equal(table[:rows], torch.zeros_like(table[:rows])) and not table.requires_grad
    loss = mae.train()(images)
    loss.backward()
    assert torch.isfinite(loss) and vit.patch_embed.proj.weight.grad.abs().sum() > 0


# --- Token Reconstruction on CNNs
def test_token_reconstruction_on_a_cnn_corrupts_stem_cells_and_matches_its_feature_map():
    torch.manual_seed(0)
    cnn = build("backbone/resnet50", img_size=64, model_kwargs=TINY_RESNET)
    objective = build("objective/token_reconstruction", backbone=cnn).eval()
    images = torch.randn(2, 3, 64, 64)
    assert objective.corruption_cells(images) == 32 * 32 and objective.corruption_token.shape == (64,)  # act1
    tokens = objective.student_tokens(images)
    torch.testing.assert_close(tokens, cnn.forward_features(images).flatten(2).transpose(1, 2))
    assert tokens.shape == (2, 2 * 2, 32 * 4)  # the /32 map's positions x layer4's channels
    everything = torch.ones(2, 32 * 32, dtype=torch.bool)
    torch.testing.assert_close(objective.student_tokens(images, everything),
                               objective.student_tokens(torch.randn(2, 3, 64, 64), everything))  # fmt: skip
    seen = {}  # what the layer after the stem (ResNet's max-pool) receives: the stem's output, corrupted or not
    cnn.maxpool.register_forward_pre_hook(lambda module, inputs: seen.update({len(seen): inputs[0]}))
    corrupt = objective.corruption_mask(2, 32 * 32, images.device)
    objective.student_tokens(images), objective.student_tokens(images, corrupt)
    clean, corrupted = seen[0], seen[1]
    cells = corrupt.view(2, 1, 32, 32).expand_as(clean)
    assert corrupt[0].any() and not corrupt[-1].any(), "the last image of the batch stays clean"
    assert corrupted[cells].abs().max() == 0, "corrupted cells hold the corruption token (zeros)"
    assert torch.equal(corrupted[~cells], clean[~cells])
    with pytest.raises(ValueError, match="a CNN, it has no prefix tokens"):
        build("objective/token_reconstruction", backbone=cnn, target_tokens="prefix")
