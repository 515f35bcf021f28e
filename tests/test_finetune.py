import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from greenlab.config import build
from greenlab.data.base import ItemDataset, Task
from greenlab.data.transforms2d import finetune_transforms


class TinyCNN(nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward_features(self, x):
        return self.conv(x)


class FakeData:
    """60 images whose class (0, 1, 2) sets their brightness: learnable in a few epochs."""

    img_size, mean, std = 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    dataset_name = "fake"

    def __init__(self):
        rng = np.random.default_rng(0)
        self.labels = torch.tensor(np.repeat([0, 1, 2], 20)).unsqueeze(1)
        self.pixels = [
            np.clip(rng.normal(60 + 70 * int(y), 10, (16, 16, 3)), 0, 255).astype(np.uint8)
            for y in self.labels
        ]
        self.tasks = [Task("grade", 3)]
        self.probe_train_set, self.probe_test_set = self.half(range(0, 60, 2)), self.half(range(1, 60, 2))

    def fold_transforms(self, img_size):
        return finetune_transforms(img_size or self.img_size, self.mean, self.std)

    def half(self, indices) -> ItemDataset:
        indices = list(indices)
        return ItemDataset(
            [str(i) for i in indices],
            lambda k: Image.fromarray(self.pixels[indices[k]]),
            self.labels[indices],
            None,
        )


def test_kfold_finetune_learns_and_reports_every_fold():
    torch.manual_seed(0)
    evaluation = build(
        "evaluation/finetune",
        folds=3,
        epochs=15,
        batch_size=8,
        lr=3e-2,
        weight_decay=0.0,
        num_workers=0,
        head_dropout=0.0,
        img_size=None,  # the data's; no warm-up, mixup, smoothing or EMA in 15 epochs of a tiny CNN
        warmup_epochs=0,
        mixup=0.0,
        cutmix=0.0,
        label_smoothing=0.0,
        ema_decay=None,
    )
    backbone = TinyCNN()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = evaluation(backbone, FakeData(), torch.device("cpu"))
    metrics = result.metrics
    assert len(metrics["finetune_folds"]) == 3
    assert sum(f["n_test"] for f in metrics["finetune_folds"]) == 60, "every labelled image is scored once"
    assert metrics["finetune_accuracy_mean"] > 0.8 and metrics["finetune_auroc_mean"] > 0.9
    assert metrics["finetune_kappa_mean"] > 0.7  # quadratic-weighted: the task is ordinal
    assert 0 <= metrics["finetune_accuracy_std"] < 0.3
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), (
            "each fold fine-tunes a copy; the backbone itself is untouched"
        )
    assert result.embedding.dim == 8


def test_nn_mobilenet_recipe_trains_with_mixup_and_scores_the_ema():
    """nn-MobileNet main.py: mixup 0.8 / CutMix 1.0 with label smoothing 0.1, EMA 0.9999 scored, warm-up + cosine."""
    evaluation = build("evaluation/finetune", folds=2, epochs=1, batch_size=8, img_size=None, num_workers=0)
    assert (evaluation.mixup, evaluation.cutmix, evaluation.label_smoothing, evaluation.ema_decay) == (
        0.8,
        1.0,
        0.1,
        0.9999,
    )
    assert (evaluation.lr, evaluation.min_lr, evaluation.warmup_epochs) == (1e-3, 1e-6, 20)
    assert build("evaluation/finetune").epochs == 1000 and build("evaluation/finetune").img_size == 512
    assert evaluation.lr_factor(0, total=100, warmup=10) == 0.0 and evaluation.lr_factor(10, 100, 10) == 1.0
    assert evaluation.lr_factor(100, 100, 10) * evaluation.lr == pytest.approx(1e-6)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    dataset = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.arange(16)[:, None] % 3)
    scored = evaluation._train(model, dataset, 0, 3, torch.device("cpu"), "test")
    assert scored is not model
    ema_weight, weight = scored[1].weight, model[1].weight  # EMA 0.9999 over 2 steps: still near the start
    assert not torch.equal(ema_weight, weight)


def test_finetuning_label_efficiency_trains_each_fold_on_nested_subsets(tmp_path):
    """label_fractions: the same folds trained again on a share of each fold's training labels (at least one per
    class), scored on the whole fold; the table and the plot."""
    from types import SimpleNamespace

    from greenlab.results.model import Phase

    torch.manual_seed(0)
    evaluation = build("evaluation/finetune", folds=2, epochs=2, batch_size=8, img_size=None, num_workers=0, mixup=0.0,
                       cutmix=0.0, ema_decay=None, warmup_epochs=0, label_fractions=[0.1, 1.0], label_counts=[2])  # fmt: skip
    metrics = evaluation(TinyCNN(), FakeData(), torch.device("cpu")).metrics
    points = metrics["finetune_label_efficiency"]["grade"]
    assert list(points) == ["fraction=0.1", "fraction=1", "count=2"]
    assert (
        points["fraction=1"]["labels"] == 30 and points["count=2"]["labels"] == 6
    )  # 2 per class, 30 per fold
    assert (
        points["fraction=0.1"]["labels"] == 3 and points["fraction=1"]["repeats"] == 2
    )  # ceil(0.1 x 10) per class
    assert all(0 <= p["auroc"] <= 1 and p["fit_seconds"] > 0 for p in points.values())
    results = SimpleNamespace(experiment="x", metrics=metrics,
                              phases={"evaluate": Phase(seconds=10.0, kwh=0.001, co2e_kg=0.0, energy_method="e")})  # fmt: skip
    assert any(line.startswith("| grade | count=2 | 6 |") for line in evaluation.markdown(results))
    assert evaluation.figures(results, tmp_path) == [tmp_path / "finetune_label_efficiency.png"]
