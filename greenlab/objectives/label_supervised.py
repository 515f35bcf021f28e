"""GreenRFM / MUST stage 1: one encoder trained alone on report-derived labels (multi-label BCE).

For C binary findings with labels y (B, C) in {1, 0, -1 = uncertain or missing} and logits z = W f(x):

    L = Σ_{b,c} m_bc · BCE(z_bc, y_bc) / Σ m_bc,      m_bc = [y_bc ≠ -1]

uncertain / missing labels are masked out (Merlin's choice; GreenRFM's public CT code keeps them).
AdamW lr 1e-4, wd 1e-4, cosine to 1e-6 (shared/REFERENCE.md §3). The head is built in ``setup`` from the
DataModule's tasks, which must all be binary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import (
    adamw_warmup_cosine,
    decay_param_groups,
    layout_independent_init,
    log_train_loss,
)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the labelled (label >= 0) entries of (B, C) logits / labels; 0 when none is."""
    known = labels >= 0
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known].float(), labels[known].float())


class LabelSupervised(PretrainingModule):
    """Args: backbone (an encoder giving (B, num_features) vectors), lr / weight_decay (AdamW), warmup_epochs,
    cosine_epochs, min_lr (per-epoch schedule, see ``warmup_cosine_factor``)."""

    def __init__(self, backbone: nn.Module, lr: float, weight_decay: float, warmup_epochs: int,
                 cosine_epochs: int, min_lr: float):  # fmt: skip
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.encoder = backbone
        self.head: nn.Linear | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.head is not None:
            return
        tasks = self.trainer.datamodule.tasks
        if not tasks or any(t.num_classes != 2 for t in tasks):
            raise ValueError(f"label-supervised training needs binary findings; the data has {tasks}")
        with layout_independent_init():
            self.head = nn.Linear(self.encoder.num_features, len(tasks))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, C) logits."""
        return self.head(self.encoder(images))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = masked_bce(self(images), labels)
        log_train_loss(self, loss, len(images))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups = decay_param_groups([self.encoder, self.head], hp.weight_decay)
        return adamw_warmup_cosine(groups, hp.lr, hp.lr, hp.min_lr, hp.warmup_epochs, hp.cosine_epochs)

    def trained_backbone(self) -> nn.Module:
        return self.encoder
