"""GreenRFM / MUST stage 1: one encoder trained alone on report-derived labels (multi-label BCE).

For C binary findings with labels in {1 present, 0 absent, UNCERTAIN, MISSING (a finding the report does not
mention, or no label)} and logits z = W f(x), the targets y and the mask m come from ``code_labels``:

    L = Σ_{b,c} m_bc · BCE(z_bc, y_bc) / Σ m_bc

- official (SadVoxel/GreenRFM data/ct_rate.py, data/merlin.py: ``.fillna(0.0)``, no remap of -1):
  ``unmentioned=negative`` (y = 0) and ``uncertain=target`` (y = -1 goes into BCE with logits as it is, m = 1
  everywhere: the loss is torch's ``nn.BCEWithLogitsLoss()`` of training/supervise_pretrain.py). A -1 target
  gives the loss softplus(z) + z, gradient sigmoid(z) + 1 > 0: the logit is pushed down without bound
  (a "super-negative"), harder than an absent label (gradient sigmoid(z)).
- greenlab's options: ``mask`` (m = 0: Merlin's choice) for either; uncertain also ``positive`` / ``negative``.

AdamW lr 1e-4, wd 1e-4 on every parameter (``weight_decay_on=all``; ``matrices``: not on biases / norms),
cosine to 1e-6 stepped per optimiser step (``lr_interval=step``, torch's CosineAnnealingLR(T_max = epochs x
batches) stepped per batch; ``epoch``: once per epoch) (shared/REFERENCE.md §3). The head is built in ``setup``
from the DataModule's tasks, which must all be binary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from greenlab.data.base import MISSING, UNCERTAIN
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import (
    adamw_warmup_cosine,
    decay_param_groups,
    iterations_per_epoch,
    layout_independent_init,
    log_train_loss,
)

CODING = {  # the values of each label option: what an uncertain / an unmentioned label becomes (None: masked)
    "uncertain": {"target": -1.0, "mask": None, "positive": 1.0, "negative": 0.0},
    "unmentioned": {"negative": 0.0, "mask": None},
}
CHOICES = {
    **{name: tuple(values) for name, values in CODING.items()},
    "weight_decay_on": ("all", "matrices"),
    "lr_interval": ("step", "epoch"),
}


STAGE1_SUBSET = (  # results.json objective.stage1_subset: the official training subset, not reproduced
    "every training study; official training/supervise_pretrain.py __main__ trains on a random 90 % "
    "(torch random_split, unseeded), its other 10 % never used"
)


def check_choice(name: str, value: str, choices: dict = CHOICES) -> None:
    if value not in choices[name]:
        raise ValueError(f"{name} must be one of {choices[name]}, not {value!r}")


def code_labels(labels: torch.Tensor, uncertain: str, unmentioned: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets float, known bool) of (B, C) labels (1, 0, UNCERTAIN, MISSING) for ``masked_bce``: uncertain
    -> -1 kept as a BCE target (``target``, official), 1 / 0, or masked; unmentioned (MISSING) -> 0
    (``negative``, official) or masked."""
    targets, known = labels.float().clone(), torch.ones_like(labels, dtype=torch.bool)
    for code, value in (
        (UNCERTAIN, CODING["uncertain"][uncertain]),
        (MISSING, CODING["unmentioned"][unmentioned]),
    ):
        where = labels == code
        if value is None:
            known &= ~where
        else:
            targets[where] = value
    return targets, known


def masked_bce(
    logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean BCE with logits over the ``known`` entries of (B, C) logits / targets (default: target >= 0; a
    target of -1 in ``known`` is a BCE target, as torch computes it); 0 when none is known."""
    known = targets >= 0 if known is None else known
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known].float(), targets[known].float())


def param_groups(modules: list[nn.Module], weight_decay: float, weight_decay_on: str) -> list[dict]:
    """AdamW groups: weight decay on every parameter (``all``, one group) or on weight matrices only
    (``matrices``: ``decay_param_groups``)."""
    if weight_decay_on == "matrices":
        return decay_param_groups(modules, weight_decay)
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": weight_decay}]


class LabelSupervised(PretrainingModule):
    """Args: backbone (an encoder giving (B, num_features) vectors), lr / weight_decay (AdamW), weight_decay_on
    (all | matrices), warmup_epochs, cosine_epochs, min_lr (``warmup_cosine_factor``), lr_interval (step |
    epoch), uncertain (target | mask | positive | negative), unmentioned (negative | mask)."""

    def __init__(self, backbone: nn.Module, lr: float, weight_decay: float, weight_decay_on: str,
                 warmup_epochs: int, cosine_epochs: int, min_lr: float, lr_interval: str, uncertain: str,
                 unmentioned: str):  # fmt: skip
        super().__init__()
        for name, value in (("weight_decay_on", weight_decay_on), ("lr_interval", lr_interval),
                            ("uncertain", uncertain), ("unmentioned", unmentioned)):  # fmt: skip
            check_choice(name, value)
        self.save_hyperparameters(ignore=["backbone"])
        self.encoder = backbone
        self.head: nn.Linear | None = None

    def run_notes(self) -> dict:
        return {"stage1_subset": STAGE1_SUBSET}

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
        targets, known = code_labels(labels, self.hparams.uncertain, self.hparams.unmentioned)
        loss = masked_bce(self(images), targets, known)
        log_train_loss(self, loss, len(images))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups([self.encoder, self.head], hp.weight_decay, hp.weight_decay_on)
        steps = iterations_per_epoch(self) if hp.lr_interval == "step" else None
        return adamw_warmup_cosine(groups, hp.lr, hp.lr, hp.min_lr, hp.warmup_epochs, hp.cosine_epochs,
                                   steps_per_epoch=steps)  # fmt: skip

    def trained_backbone(self) -> nn.Module:
        return self.encoder
