"""RETFound's fine-tuning recipe (evaluation=finetune_retfound), checked against rmaphoh/RETFound_MAE's code: the
official formulas are written out here, not imported."""

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from greenlab.config import build
from greenlab.data.base import ItemDataset, Task
from greenlab.evaluation import finetune
from greenlab.objectives.optim import layer_decay_param_groups

CPU = torch.device("cpu")


def tiny_vit(num_classes: int = 0, drop_path_rate: float = 0.0):
    """A 3-block ViT-Ti/16 at 32 px (4 patches), random weights: nothing is downloaded."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3,
                             num_classes=num_classes, drop_path_rate=drop_path_rate)  # fmt: skip


def official_scale_and_decay(name: str, param, depth: int, no_weight_decay_list) -> tuple[float, float]:
    """util/lr_decay.py param_groups_lrd + get_layer_id_for_vit, layer_decay 0.65, weight decay 0.05."""
    num_layers = depth + 1  # num_layers = len(model.blocks) + 1
    layer_scales = [0.65 ** (num_layers - i) for i in range(num_layers + 1)]
    if name in ["cls_token", "pos_embed"] or name.startswith("patch_embed"):
        layer_id = 0
    elif name.startswith("blocks"):
        layer_id = int(name.split(".")[1]) + 1
    else:
        layer_id = num_layers
    decay = 0.0 if param.ndim == 1 or name in no_weight_decay_list else 0.05
    return layer_scales[layer_id], decay


def test_layer_decay_groups_are_retfounds_param_groups_lrd():
    vit = tiny_vit(num_classes=2)
    groups = layer_decay_param_groups(vit, 0.05, 0.65, vit.no_weight_decay())
    names = {id(p): n for n, p in vit.named_parameters()}
    seen = []
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.append(name)
            expected = official_scale_and_decay(name, param, 3, vit.no_weight_decay())
            assert (group["lr_scale"], group["weight_decay"]) == pytest.approx(expected), name
    assert sorted(seen) == sorted(names.values()), "every parameter in exactly one group"
    assert len(groups) == 2 * 5  # layers 0 (embedding), 1-3 (blocks), 4 (norm, head); decayed or not


def test_the_recipe_optimiser_reads_retfound_scales_decay_and_lr(monkeypatch):
    """The AdamW the recipe builds around a ViT + global-pool head: RETFound's lr_scale and weight decay per
    parameter, lr = blr x batch / 256 times the scale; fc_norm and head (outside the ViT) at scale 1."""
    evaluation = build("evaluation/finetune_retfound", epochs=1, batch_size=4, num_workers=0, bf16=False)
    built, original = [], torch.optim.AdamW
    monkeypatch.setattr(
        finetune.torch.optim, "AdamW", lambda g, **kw: built.append(original(g, **kw)) or built[-1]
    )
    vit = tiny_vit()
    model = finetune.Classifier(vit, vit.num_features, 2, 0.0, "fc_norm_mean_patch", 2e-5)
    data = [(torch.randn(3, 32, 32), torch.tensor([k % 2])) for k in range(8)]
    evaluation._train(model, data, 0, 2, CPU, "test")
    names = {id(p): n for n, p in model.named_parameters()}
    assert "backbone.norm.weight" not in names.values() and "fc_norm.weight" in names.values()  # global pool
    peak = 5e-3 * 4 / 256
    assert evaluation.peak_lr == pytest.approx(peak)
    for group in built[0].param_groups:
        for param in group["params"]:
            name = names[id(param)]
            inner = name.removeprefix("backbone.") if name.startswith("backbone.") else "head_or_fc_norm"
            scale, decay = official_scale_and_decay(inner, param, 3, vit.no_weight_decay())
            assert group["lr_scale"] == pytest.approx(scale) and group["weight_decay"] == decay, name
            assert group["initial_lr"] == pytest.approx(peak * scale), name
    assert {names[id(p)] for g in built[0].param_groups if g["weight_decay"] == 0.0 for p in g["params"]} >= {
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.patch_embed.proj.bias",
        "fc_norm.weight",
    }


def test_finetune_retfound_has_retfounds_values():
    ev = build("evaluation/finetune_retfound")
    assert (ev.epochs, ev.batch_size, ev.img_size, ev.warmup_epochs) == (100, 16, 224, 10)  # README command
    assert (ev.lr, ev.lr_reference_batch, ev.peak_lr) == (5e-3, 256, pytest.approx(3.125e-4))
    assert (ev.min_lr, ev.weight_decay, ev.layer_decay, ev.drop_path) == (1e-6, 0.05, 0.65, 0.2)
    assert (ev.clip_grad_norm, ev.head_dropout, ev.ema_decay) == (None, 0.0, None)
    assert (ev.label_smoothing, ev.mixup, ev.cutmix) == (0.0, 0.0, 0.0)  # CrossEntropyLoss; Mixup off
    assert (ev.pooling, ev.head_init_std, ev.augmentation) == ("fc_norm_mean_patch", 2e-5, "retfound")
    assert (ev.selection, ev.validation_fraction, ev.bf16) == ("best_on_validation", 0.2, True)
    nn_mobilenet = build("evaluation/finetune")  # the new options are off there
    assert (nn_mobilenet.layer_decay, nn_mobilenet.drop_path, nn_mobilenet.lr_reference_batch) == (None,) * 3
    assert (nn_mobilenet.pooling, nn_mobilenet.head_init_std, nn_mobilenet.augmentation) == (None,) * 3
    assert nn_mobilenet.peak_lr == nn_mobilenet.lr == 1e-3

    # util/lr_sched.py adjust_learning_rate, called every iteration at epoch = step / steps per epoch + epoch
    def official(epoch):
        if epoch < 10:
            return ev.peak_lr * epoch / 10
        return 1e-6 + (ev.peak_lr - 1e-6) * 0.5 * (1.0 + math.cos(math.pi * (epoch - 10) / (100 - 10)))

    per_epoch = 7
    for step in (0, 3, 69, 70, 71, 300, 699):
        factor = ev.lr_factor(step, total=100 * per_epoch, warmup=10 * per_epoch)
        assert factor * ev.peak_lr == pytest.approx(official(step / per_epoch), abs=1e-12)

    # util/datasets.py build_transform at --input_size 224
    train_tf, eval_tf = finetune.FINETUNE_TRANSFORMS["retfound"](
        224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    described = repr(train_tf)
    assert (
        "RandAugment(n=2" in described
        and "m=9, mstd=0.5" in described
        and "SolarizeIncreasing" in described  # inc1
        and "RandomErasing(p=0.25, mode=pixel" in described
    )
    assert (
        "scale=(0.08, 1.0)" in described
        and "interpolation=bicubic" in described
        and "ColorJitter" not in described
    )
    resize, crop = eval_tf.transforms[:2]
    assert list(resize.size) == [256] and list(crop.size) == [224, 224]  # crop_pct 224 / 256


def test_retfound_score_is_engine_finetunes():
    """engine_finetune.py evaluate: (macro F1 + macro OvR AUROC on one-hot labels + Cohen's kappa) / 3."""
    rng = np.random.default_rng(0)
    y, proba = rng.integers(0, 3, 50), rng.dirichlet(np.ones(3), 50)
    onehot, predicted = np.eye(3)[y], proba.argmax(1)
    expected = (
        f1_score(onehot, np.eye(3)[predicted], zero_division=0, average="macro")
        + roc_auc_score(onehot, proba, multi_class="ovr", average="macro")
        + cohen_kappa_score(y, predicted)
    ) / 3
    assert finetune.retfound_score(y, proba, 3) == pytest.approx(expected)


def test_drop_path_rises_linearly_over_the_blocks_as_timm_builds_it():
    vit, reference = tiny_vit(), tiny_vit(drop_path_rate=0.2)
    finetune.set_drop_path(vit, 0.2)
    expected = [x.item() for x in torch.linspace(0, 0.2, 3)]  # timm VisionTransformer: dpr
    for block, ref, p in zip(vit.blocks, reference.blocks, expected, strict=True):
        for name in ("drop_path1", "drop_path2"):
            ours, theirs = getattr(block, name), getattr(ref, name)
            assert type(ours) is type(theirs) and getattr(ours, "drop_prob", 0.0) == pytest.approx(p)


class RandomPhotos:
    """24 random 32 px photographs in 2 classes (RETFound's augmentation reads PIL images)."""

    img_size, mean, std = 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    dataset_name = "random"

    def __init__(self):
        rng = np.random.default_rng(0)
        self.pixels = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
        self.labels = torch.tensor(np.arange(24) % 2).unsqueeze(1)
        self.tasks = [Task("label", 2)]
        self.probe_train_set, self.probe_test_set = self.part(range(0, 16)), self.part(range(16, 24))

    def part(self, rows) -> ItemDataset:
        rows = list(rows)
        return ItemDataset([str(r) for r in rows], lambda k: Image.fromarray(self.pixels[rows[k]]),
                           self.labels[rows], None)  # fmt: skip

    def fold_transforms(self, img_size):
        raise AssertionError("augmentation=retfound builds its own pair")


def test_a_tiny_retfound_finetuning_run_selects_on_validation_and_reports(monkeypatch):
    torch.manual_seed(0)
    evaluation = build("evaluation/finetune_retfound", folds=2, epochs=2, warmup_epochs=1, batch_size=4,
                       img_size=None, num_workers=0, bf16=False)  # fmt: skip
    scored_on = []
    score = finetune.retfound_score
    monkeypatch.setattr(
        finetune, "retfound_score", lambda y, p, k: scored_on.append(len(y)) or score(y, p, k)
    )
    backbone = tiny_vit()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = evaluation(backbone, RandomPhotos(), CPU)
    metrics = result.metrics
    assert len(metrics["finetune_folds"]) == 2 and sum(f["n_test"] for f in metrics["finetune_folds"]) == 24
    assert (
        metrics["finetune_selection"] == "best_on_validation"
        and metrics["finetune_validation_fraction"] == 0.2
    )
    assert 0.0 <= metrics["finetune_auroc_mean"] <= 1.0 and 0.0 <= metrics["finetune_accuracy_mean"] <= 1.0
    assert scored_on == [3, 3, 3, 3], "each epoch scored on a stratified 20% of the fold's 12 training images"
    assert (
        isinstance(backbone.norm, torch.nn.LayerNorm)
        and type(backbone.blocks[2].drop_path1).__name__ == "Identity"
    )
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items()), "folds train copies"
    assert any("RETFound's score" in line for line in evaluation.markdown(result))
