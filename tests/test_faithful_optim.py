"""Issue #27, the second faithfulness pass: optimisers, schedules, init, dropout and precision of SparK, the MAE
baseline and nn-MobileNet's fine-tuning equal their official code (values and files in the config comments)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from greenlab.config import CONFIG_DIR, build
from tests.test_mae import tiny_mae


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def sparks_lr_wd_annealing(peak_lr, wd, wd_end, cur_it, wp_it, max_it):
    """keyu-tian/SparK pretrain/utils/lr_control.py lr_wd_annealing, verbatim arithmetic (one group)."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        cur_lr = 0.005 * peak_lr + 0.995 * peak_lr * cur_it / wp_it
    else:
        ratio = (cur_it - wp_it) / (max_it - 1 - wp_it)
        cur_lr = 0.001 * peak_lr + 0.999 * peak_lr * (0.5 + 0.5 * math.cos(math.pi * ratio))
    ratio = cur_it / (max_it - 1)
    cur_wd = wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * ratio))
    return cur_lr, cur_wd


class Images(L.LightningDataModule):
    def __init__(self, n: int, batch_size: int, size: int = 64):
        super().__init__()
        self.n, self.batch_size, self.size = n, batch_size, size

    def train_dataloader(self):
        data = TensorDataset(torch.randn(self.n, 3, self.size, self.size), torch.zeros(self.n))
        return DataLoader(data, batch_size=self.batch_size)


def fit(module, steps: int, n: int = 8, batch_size: int = 2) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=Images(n, batch_size))
    return trainer


def tiny_spark(**changes):
    torch.manual_seed(0)
    backbone = build("backbone/nn_mobilenet", model_name="rexnet_100")
    changes = {"decoder_width": 32, "figure_every_n_epochs": 0, **changes}
    return build("objective/spark", backbone=backbone, sparse_backend="masked_dense", **changes)


def test_spark_schedule_is_sparks_lr_wd_annealing_per_iteration():
    from greenlab.objectives.spark import lr_wd_annealing

    for step in (0, 1, 5, 39, 40, 41, 500, 1598, 1599):
        lr, wd = lr_wd_annealing(step, 40, 1600, 0.005, 0.001, 0.04, 0.2)
        official_lr, official_wd = sparks_lr_wd_annealing(1.0, 0.04, 0.2, step, 40, 1600)
        assert (lr, wd) == pytest.approx((official_lr, official_wd), rel=1e-12), step
    assert lr_wd_annealing(5000, 40, 1600, 0.005, 0.001, 0.04, 0.2) == lr_wd_annealing(1599, 40, 1600, 0.005, 0.001,
                                                                                         0.04, 0.2)  # fmt: skip
    # in a fit: 4 batches per epoch, 1 warm-up epoch of 3: lr and wd at every optimiser step as SparK's
    spark = tiny_spark(warmup_epochs=1, cosine_epochs=3, optimizer="adamw")
    seen = []
    spark.on_before_optimizer_step = lambda optimizer: seen.append(
        (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"],
         optimizer.param_groups[1]["weight_decay"])
    )  # fmt: skip
    fit(spark, steps=7, n=8, batch_size=2)
    peak = 2.0e-4 * 2 / 256
    for step, (lr, wd, undecayed_wd) in enumerate(seen):
        official_lr, official_wd = sparks_lr_wd_annealing(peak, 0.04, 0.2, step, 4, 12)
        assert (lr, wd, undecayed_wd) == pytest.approx((official_lr, official_wd, 0.0), rel=1e-9), step


def test_spark_paper_optimiser_is_lamb_clipping_at_5_and_fp32():
    """arg_util.py opt='lamb', main.py TheSameAsTimmLAMB(betas=(0.9, ada), max_grad_norm=5.0), no AMP."""
    from timm.optim import Lamb

    spark = tiny_spark()
    spark.effective_batch_size = 256  # what fit's setup sets
    optimizer = spark.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, Lamb) and optimizer.defaults["max_grad_norm"] == 5.0
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-6
    for experiment in ("sparse_cnn_mae", "spark_resnet50", "spark_3d"):
        cfg = compose([f"+experiment={experiment}", "scale=paper", "trainer=gpu"])
        assert cfg.trainer.precision == "32-true" and cfg.trainer.gradient_clip_val is None, experiment
        assert cfg.objective.optimizer == "lamb" and cfg.objective.start_lr_ratio == 0.005, experiment
    paper = compose(["+experiment=sparse_cnn_mae", "scale=paper"])
    assert (paper.trainer.max_epochs, paper.data.batch_size, paper.objective.cosine_epochs) == (
        1600,
        4096,
        1600,
    )


def test_spark_decoder_and_mask_token_init_as_sparks_decoder_py():
    """decoder.py initialize: Conv trunc-normal(0.02), ConvTranspose kaiming-normal fan-out, biases 0, BN 1/0;
    spark.py mask tokens trunc-normal(0.02) cut at +-0.02."""
    spark = tiny_spark(decoder_width=256)
    convs = [m for m in spark.decoder.modules() if isinstance(m, nn.Conv2d)] + [spark.to_pixels]
    weights = torch.cat([m.weight.flatten() for m in convs])
    # timm's trunc_normal_(std=.02) cuts at +-2 (absolute): a plain normal at this std
    assert weights.std().item() == pytest.approx(0.02, rel=0.05) and weights.mean().abs() < 1e-3
    for up in (b.up for b in spark.decoder):
        fan_out = up.weight.shape[0] * up.weight[0, 0].numel()  # ConvTranspose weight: (in, out, k, k)
        assert up.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert torch.count_nonzero(up.bias) == 0
    assert spark.to_pixels.bias.abs().max() == 0
    tokens = torch.cat([d.mask_token.flatten() for d in spark.densify])
    assert tokens.abs().max() <= 0.02 and tokens.std() > 0.005


def test_spark_pretrains_without_spatial_dropout_and_the_encoder_keeps_it():
    """SparK --dp 0: nn-MobileNet's Dropout2d is off while reconstructing, back at 0.3 for fine-tuning."""
    spark = tiny_spark()
    dropouts = [m for m in spark.encoder.modules() if isinstance(m, nn.Dropout2d)]
    assert len(dropouts) == 16 and all(m.p == 0.0 for m in dropouts)
    exported = [m for m in spark.trained_backbone().modules() if isinstance(m, nn.Dropout2d)]
    assert len(exported) == 16 and all(m.p == 0.3 for m in exported)
    kept = tiny_spark(encoder_dropout=None)
    assert all(m.p == 0.3 for m in kept.encoder.modules() if isinstance(m, nn.Dropout2d))


def test_mae_per_iteration_warmup_from_zero_and_decayed_tokens():
    """engine_pretrain.py: adjust_learning_rate(data_iter_step / len(loader) + epoch) from 0; main_pretrain.py:
    timm 0.3.2 add_weight_decay with no skip list (cls and mask tokens decayed, 1-D parameters not)."""
    mae = tiny_mae(base_lr=1e-3, warmup_epochs=1, cosine_epochs=2, min_lr=0.0)
    seen = []
    mae.on_before_optimizer_step = lambda optimizer: seen.append(optimizer.param_groups[0]["lr"])
    fit(mae, steps=8, n=8, batch_size=2)  # 4 iterations per epoch
    peak = 1e-3 * 2 / 256
    for step, lr in enumerate(seen):
        epoch = step / 4
        official = peak * epoch if epoch < 1 else peak * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / (2 - 1)))
        assert lr == pytest.approx(official, rel=1e-9, abs=1e-15), step
    mae.effective_batch_size = 256
    decayed, undecayed = mae.configure_optimizers()["optimizer"].param_groups
    decayed_ids = {id(p) for p in decayed["params"]}
    assert id(mae.encoder.cls_token) in decayed_ids and id(mae.mask_token) in decayed_ids
    assert all(p.ndim == 1 for p in undecayed["params"]) and undecayed["weight_decay"] == 0.0
    assert not mae.encoder.pos_embed.requires_grad


def test_precision_per_experiment(monkeypatch):
    """MAE fp16 autocast + loss scaler on a GPU (16-mixed); RETFound-Green bf16; SparK fp32 everywhere."""
    from greenlab.config import auto_precision

    assert auto_precision() == auto_precision("16-mixed") == "32-true"  # this CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert (auto_precision(), auto_precision("16-mixed")) == ("bf16-mixed", "16-mixed")
    assert compose(["+experiment=mae_baseline", "scale=paper"]).trainer.precision == "16-mixed"
    assert compose(["+experiment=retfound_green", "scale=paper"]).trainer.precision == "bf16-mixed"
    assert compose(["+experiment=sparse_cnn_mae", "scale=paper"]).trainer.precision == "32-true"
    with pytest.raises(ValueError, match="bf16-mixed or 16-mixed"):
        auto_precision("fp8")


def test_augmentations_are_the_official_crops():
    """SparK imagenet.py RandomResizedCrop(0.67-1, bicubic) + flip; MAE main_pretrain.py (0.2-1, bicubic) + flip."""
    from torchvision.transforms import v2

    from greenlab.data.transforms2d import PRETRAIN_TRANSFORMS

    for name, scale in (("spark", (0.67, 1.0)), ("mae", (0.2, 1.0))):
        crop, flip, _ = PRETRAIN_TRANSFORMS[name](224, (0.5,), (0.5,)).transforms
        assert crop.scale == scale and crop.interpolation == v2.InterpolationMode.BICUBIC
        assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    assert compose(["+experiment=mae_baseline", "scale=paper"]).data.augmentation == "mae"


def test_nn_mobilenet_finetuning_groups_clipping_and_micro_metrics(monkeypatch):
    """optim_factory.py: no decay on 1-D parameters / biases; engine.py: clip_grad_norm_(..., 1.0) every step,
    AUC = roc_auc_score(one-hot.flatten(), softmax.flatten()), F1 = f1_score(average='micro')."""
    from greenlab.evaluation import finetune

    evaluation = build("evaluation/finetune", epochs=1, batch_size=4, img_size=32, warmup_epochs=0, mixup=0.0,
                       cutmix=0.0, ema_decay=None, num_workers=0)  # fmt: skip
    assert (evaluation.clip_grad_norm, evaluation.selection) == (1.0, "last")
    built, clipped = [], []
    original = torch.optim.AdamW
    monkeypatch.setattr(finetune.torch.optim, "AdamW", lambda groups, **kw: built.append(groups) or original(groups,
                                                                                                          **kw))  # fmt: skip
    monkeypatch.setattr(finetune.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 3, 32, 32))
    data = [(torch.randn(3, 32, 32), torch.tensor([k % 3])) for k in range(8)]
    evaluation._train(model, data, 0, 3, torch.device("cpu"), "test")
    decayed, undecayed = built[0]
    assert decayed["weight_decay"] == 0.05 and all(p.ndim > 1 for p in decayed["params"])
    assert (
        undecayed["weight_decay"] == 0.0 and len(undecayed["params"]) == 4
    )  # conv bias, BN weight + bias, bias
    assert clipped == [1.0, 1.0]  # every step (8 images, batch 4)
    rng = np.random.default_rng(0)
    y, proba = rng.integers(0, 3, 40), rng.dirichlet(np.ones(3), 40)
    assert finetune.micro_auroc(y, proba) == roc_auc_score(np.eye(3)[y].flatten(), proba.flatten())


def test_official_selection_picks_the_best_epoch_on_the_scored_fold(monkeypatch):
    """main.py --main_eval f1: the epoch of best micro F1 on the scored fold (the first of equals) is kept."""
    from greenlab.evaluation import finetune

    evaluation = build("evaluation/finetune", epochs=3, batch_size=4, img_size=32, warmup_epochs=0, mixup=0.0,
                       cutmix=0.0, ema_decay=None, num_workers=0, selection="official_best_on_scored_fold")  # fmt: skip
    f1_by_epoch, weights_by_epoch = iter([0.5, 0.9, 0.9]), []

    def predict(model, dataset, column, device):
        weights_by_epoch.append(model[1].weight.detach().clone())
        return np.zeros(4, int), np.full((4, 3), 1 / 3), 0.0

    monkeypatch.setattr(evaluation, "_predict", predict)
    monkeypatch.setattr(finetune, "f1_score", lambda *a, **k: next(f1_by_epoch))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    data = [(torch.randn(3, 32, 32), torch.tensor([k % 3])) for k in range(8)]
    chosen = evaluation._train(model, data, 0, 3, torch.device("cpu"), "test", select_on=data)
    assert len(weights_by_epoch) == 3 and chosen is not model
    assert torch.equal(chosen[1].weight, weights_by_epoch[1]) and not torch.equal(
        chosen[1].weight, model[1].weight
    )
    with pytest.raises(ValueError, match="official_best_on_scored_fold"):
        build("evaluation/finetune", selection="best")


def clovaai_names(timm_key: str, blocks: list) -> str:
    """timm rexnet key -> the name clovaai/rexnet's rexnetv1.py gives it (features: stem conv 0, bn 1, swish 2;
    blocks 3..; in a block's ``out``: [expand conv, bn, swish], depthwise conv, bn, [SE (fc.0, fc.1, fc.3)],
    ReLU6, projection conv, bn; then the final conv, bn)."""
    part, *rest = timm_key.split(".")
    if part == "stem":
        return f"features.{0 if rest[0] == 'conv' else 1}.{rest[-1]}"
    index = int(rest[0])
    if index == len(blocks):  # the final 1x1 conv
        return f"features.{index + 3 + (0 if rest[1] == 'conv' else 1)}.{rest[-1]}"
    block, field = blocks[index], rest[1]
    layout = (["conv_exp.conv", "conv_exp.bn", "swish"] if block.conv_exp is not None else []) + [
        "conv_dw.conv", "conv_dw.bn"] + (["se"] if not isinstance(block.se, nn.Identity) else []) + [
        "relu6", "conv_pwl.conv", "conv_pwl.bn"]  # fmt: skip
    if field == "se":
        fc = {"fc1": "fc.0", "bn": "fc.1", "fc2": "fc.3"}[rest[2]]
        return f"features.{index + 3}.out.{layout.index('se')}.{fc}.{rest[-1]}"
    return f"features.{index + 3}.out.{layout.index(f'{field}.{rest[2]}')}.{rest[-1]}"


def test_nn_mobilenet_reads_clovaais_rexnet_file(tmp_path):
    """nn-MobileNet's ImageNet start, main.py: load_state_dict(torch.load('rexnet_3.0.pth'), strict=False), a
    clovaai/rexnet file (its 1000-class output.* ignored): read by position into timm's names, shapes checked."""
    from timm.models.rexnet import LinearBottleneck

    reference = build("backbone/nn_mobilenet", model_name="rexnet_100")
    torch.manual_seed(3)
    for p in reference.state_dict().values():
        if p.is_floating_point():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    blocks = [b for b in reference.features if isinstance(b, LinearBottleneck)]
    original = {
        clovaai_names(k, blocks): v
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert len(set(original)) == len(original) and "features.3.out.0.weight" in original
    original |= {"output.1.weight": torch.randn(1000, 1280, 1, 1), "output.1.bias": torch.zeros(1000)}
    torch.save(original, tmp_path / "rexnet_1.0.pth")
    loaded = build("backbone/nn_mobilenet", model_name="rexnet_100", weights=str(tmp_path / "rexnet_1.0.pth"))
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    wrong = {k: v for k, v in original.items() if k != "features.1.bias"}
    torch.save(wrong, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="short.pth"):
        build("backbone/nn_mobilenet", model_name="rexnet_100", weights=str(tmp_path / "short.pth"))
