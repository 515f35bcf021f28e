"""A method added from outside the package: a toy backbone, objective and evaluation, configured by the YAML
beside this file (reached through Hydra's search path). Nothing under greenlab/ or greenlab/conf/ knows of them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from greenlab.evaluation.embeddings import embed
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import log_train_loss
from greenlab.results.model import Embedding, Evaluated


class PatchCNN(nn.Module):
    """One strided convolution: (B, 3, H, W) -> (B, width, H/4, W/4)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.num_features = width
        self.init_record = {"requested": "random", "used": "random", "source": None, "note": None}
        self.recipe = {"factory": f"{__name__}.PatchCNN", "width": width}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


class MeanColour(PretrainingModule):
    """L = mean_b ‖W · pool(f(x_b)) - mean_colour(x_b)‖²: the features must carry each image's mean colour."""

    def __init__(self, backbone: nn.Module, lr: float):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone, self.head = backbone, nn.Linear(backbone.num_features, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_features(images).mean(dim=(2, 3))
        return F.mse_loss(self.head(pooled), images.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        loss = self(batch[0])
        log_train_loss(self, loss, len(batch[0]))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def trained_backbone(self) -> nn.Module:
        return self.backbone

    def run_notes(self) -> dict:
        return {"toy": "mean colour regression"}


class NearestCentroid:
    """Accuracy of the nearest class mean of the probe-train embeddings, per task, on the held-out set."""

    requires = ()
    optimized_metric = "centroid_accuracy_macro"

    def __init__(self, pooling: str):
        self.pooling = pooling

    def __call__(self, backbone, datamodule, device) -> Evaluated:
        train_loader, test_loader = datamodule.probe_dataloaders()
        x_train, y_train, _ = embed(backbone, train_loader, self.pooling, device)
        x_test, y_test, seconds = embed(backbone, test_loader, self.pooling, device)
        accuracy = {}
        for t, task in enumerate(datamodule.tasks):
            classes = [c for c in range(task.num_classes) if (y_train[:, t] == c).any()]
            centroids = np.stack([x_train[y_train[:, t] == c].mean(0) for c in classes])
            scored = y_test[:, t] >= 0
            nearest = ((x_test[scored, None] - centroids[None]) ** 2).sum(-1).argmin(1)
            accuracy[task.name] = float((np.array(classes)[nearest] == y_test[scored, t]).mean())
        metrics = {
            "centroid_accuracy": accuracy,
            "centroid_accuracy_macro": float(np.mean(list(accuracy.values()))),
        }
        embedding = Embedding(int(x_test.shape[1]), "float32", int(x_test.shape[1]) * 4, self.pooling,
                              len(x_test) / seconds, "backbone forward only")  # fmt: skip
        return Evaluated(metrics, embedding=embedding)

    def markdown(self, results) -> list[str]:
        metrics = results.metrics
        lines = ["", "## Nearest-centroid accuracy (held-out split)", "", "| task | accuracy |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in metrics["centroid_accuracy"].items()]
        return lines + [f"| **macro** | **{metrics['centroid_accuracy_macro']:.3f}** |"]
