"""GreenRFM / MUST: label-supervised encoders, then a label-anchored image-text alignment.

A batch is (volumes, reports, labels): volumes (B, 1, X, Y, Z) (MRI: (B, 3, 1, X, Y, S), one per plane),
B report strings, labels (B, C) with 1 present, 0 absent, UNCERTAIN (-2), MISSING (-1); or, where the data
has reports without a volume (``data.text_only_reports``), {"paired": that tuple, "text_only": (B' reports,
(B', C) labels)}, the text-only reports joining the text encoder's stage-1 batch.

Stage 1, each encoder alone (they share no parameter, so one step trains both independently):

    L1 = BCE_m(h_img(f(x)), y) + BCE_m(h_txt(g(t ∪ t')), y ∪ y')     (t', y': text-only reports, if any)

with f the 3D image encoder (512-d), g the text encoder ([CLS]), h_* linear heads and BCE_m the mean
BCE with logits over the entries ``code_labels`` keeps (objectives/label_supervised.py). Official (SadVoxel/GreenRFM
data/ct_rate.py, data/merlin.py): an unmentioned finding is a 0 (``unmentioned=negative``) and an uncertain one
keeps its -1 as the BCE target (``uncertain=target``: loss softplus(z) + z, pushing the logit down without
bound), nothing masked, so BCE_m is torch's ``nn.BCEWithLogitsLoss()``; greenlab's ``mask`` leaves either out.

Stage 2, alignment: projections without bias, u = P_i f(x), v = P_t g(t) (latent_dim), ONE classifier W:

    S = u vᵀ (B, B), un-normalised dot products, temperature 1
    L2 = ½ [CE(S, diag) + CE(Sᵀ, diag)] + ½ [BCE_m(W u, y) + BCE_m(W v, y)]

Stage 1 (AdamW lr 1e-4, wd 1e-4 on every parameter, cosine to 1e-6 stepped per optimiser step as the official
CosineAnnealingLR) runs for ``stage1_epochs``, stage 2 (AdamW lr 1e-5, no weight decay, grad clip 0.5) for the
rest of the Trainer's ``max_epochs``; batch 10, 5 + 5 epochs in the paper, fp32 (shared/REFERENCE.md §3).
At the switch the optimiser state is cleared (a fresh AdamW, as the paper's separate runs have) and the
stage-1 encoders and heads are saved to the run folder. Stage 2 starts from those encoders, or, with ``stage1_weights`` (a folder an earlier run saved them to), from that run's (stage 1
is then skipped). Its projections and shared classifier start random (``stage2.start=random``, the paper),
or from the stage-1 heads (``stage1_heads``: latent coordinate k = finding k's stage-1 logit on both sides,
W reads it back; for short schedules, where a random start spends its few steps on the strongest findings).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from greenlab.backbones import weights
from greenlab.contracts import ReportsSource
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.label_supervised import CODING, STAGE1_SUBSET, check_choice, code_labels, masked_bce
from greenlab.objectives.optim import (
    adamw,
    decay_param_groups,
    iterations_per_epoch,
    layout_independent_init,
    log_train_loss,
    warmup_cosine_factor,
)

STAGE1_FILES = {
    "image_encoder": "stage1_image_encoder.pth",
    "text_encoder": "stage1_text_encoder.pth",
    "image_head": "stage1_image_head.pth",
    "text_head": "stage1_text_head.pth",
}
CHOICES = {  # the values each option takes
    **{name: tuple(values) for name, values in CODING.items()},
    "lr_interval": ("step", "epoch"),
    "stage1.weight_decay_on": ("all", "matrices"),
    "stage2.weight_decay_on": ("all", "matrices"),
    "stage2.start": ("random", "stage1_heads"),
    "stage2.projection_init": ("default", "unit_norm"),
}


class AlignedEncoders(nn.Module):
    """The stage-2 model: image and report latents in one space, and the shared classifier.

    ``forward(volumes)`` -> (B, latent_dim) image latents (so linear probes work on it);
    ``encode_text(texts)`` -> (B, latent_dim); ``classifier(latent)`` -> (B, C) logits.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, latent_dim: int, num_findings: int,
                 projection_init: str = "default"):  # fmt: skip
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_projection = nn.Linear(image_encoder.num_features, latent_dim, bias=False)
        self.text_projection = nn.Linear(text_encoder.num_features, latent_dim, bias=False)
        if projection_init == "unit_norm":  # PyTorch's default init is the official start ("default")
            # raw dot products (temperature 1): start each latent with a norm of about its features' RMS (~1),
            # so the first contrastive logits are O(1), not in the tens as with PyTorch's default init
            for projection in (self.image_projection, self.text_projection):
                nn.init.normal_(projection.weight, std=(projection.in_features * latent_dim) ** -0.5)
        self.classifier = nn.Linear(latent_dim, num_findings)
        self.num_features = latent_dim
        self.init_record = {"image": image_encoder.init_record, "text": text_encoder.init_record}
        self.recipe = {"factory": f"{__name__}.{type(self).__name__}", "image_encoder": image_encoder.recipe,
                       "text_encoder": text_encoder.recipe, "latent_dim": latent_dim, "num_findings": num_findings,
                       "projection_init": projection_init}  # fmt: skip

    def forward(self, volumes) -> torch.Tensor:
        return self.image_projection(self.image_encoder(volumes))

    def forward_features(self, volumes) -> torch.Tensor:
        return self(volumes)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text_projection(self.text_encoder(texts))

    @torch.no_grad()
    def anchor_to_heads(self, image_head: nn.Linear, text_head: nn.Linear) -> None:
        """Start the latent space from the stage-1 heads: latent coordinate k < C holds finding k's stage-1
        logit (bias left out), u_k = (H_i f)_k and v_k = (H_t g)_k, and the shared classifier reads them
        back (W = [I_C | 0], bias the heads' mean). So from the first stage-2 step u·v = Σ_k (H_i f)_k (H_t g)_k
        + the other coordinates' small random part, and a prompt pair scores u·(v⁺_c - v⁻_c), which is
        about (H_i f)_c times how much the stage-1 text head tells the two prompts apart."""
        c = self.classifier.out_features
        if c > self.image_projection.out_features:
            raise ValueError(f"objective.stage2.start=stage1_heads needs a latent of at least {c} dimensions (one "
                             f"per finding); objective.latent_dim is {self.image_projection.out_features}")  # fmt: skip
        self.image_projection.weight[:c] = image_head.weight
        self.text_projection.weight[:c] = text_head.weight
        self.classifier.weight.zero_()
        self.classifier.weight[:, :c] = torch.eye(c)
        self.classifier.bias.copy_(0.5 * (image_head.bias + text_head.bias))


def symmetric_contrastive_loss(image_latents: torch.Tensor, text_latents: torch.Tensor) -> torch.Tensor:
    """½ [CE(S, diag) + CE(Sᵀ, diag)], S = image_latents @ text_latentsᵀ (B, B), no normalisation."""
    similarity = image_latents.float() @ text_latents.float().t()
    targets = torch.arange(len(similarity), device=similarity.device)
    return 0.5 * (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.t(), targets))


class MUST(PretrainingModule):
    """Args: image_encoder, text_encoder, latent_dim (768), stage1_epochs, stage1 / stage2 (lr,
    weight_decay, weight_decay_on (all | matrices), min_lr; stage 1 also text_lr, stage 2 classifier_lr,
    gradient_clip_val and start (random | stage1_heads)), lr_interval (step | epoch), uncertain (target | mask |
    positive | negative), unmentioned (negative | mask), stage1_weights (folder)."""

    requires = (ReportsSource,)  # the reports of the training studies fit the random BERT's vocabulary
    reads_reports = True
    compiled = ("image_encoder",)  # the steps call the encoders; the text side tokenises lists of strings

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, latent_dim: int, stage1_epochs: int,
                 stage1: dict, stage2: dict, lr_interval: str, uncertain: str, unmentioned: str,
                 stage1_weights: str | None):  # fmt: skip
        super().__init__()
        self.save_hyperparameters(ignore=["image_encoder", "text_encoder"])
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.stage1_epochs = 0 if stage1_weights else stage1_epochs
        self.settings = {"stage1": dict(stage1), "stage2": dict(stage2)}
        options = {"uncertain": uncertain, "unmentioned": unmentioned, "lr_interval": lr_interval,
                   **{f"{stage}.{key}": self.settings[stage][key] for stage, key in (
                       ("stage1", "weight_decay_on"), ("stage2", "weight_decay_on"), ("stage2", "start"),
                       ("stage2", "projection_init"))}}  # fmt: skip
        for name, value in options.items():
            check_choice(name, value, CHOICES)
        self.image_head = self.text_head = self.aligned = None

    def run_notes(self) -> dict:
        hp = self.hparams
        return {"stage1_epochs": self.stage1_epochs, "uncertain_labels": hp.uncertain,
                "unmentioned_labels": hp.unmentioned, "stage1_weights": hp.stage1_weights,
                "stage_settings": self.settings, "stage1_subset": STAGE1_SUBSET}  # fmt: skip

    @property
    def stage(self) -> str:
        return "stage1" if self.current_epoch < self.stage1_epochs else "stage2"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.aligned is None:
            if self.trainer.max_epochs <= self.stage1_epochs and not self.trainer.fast_dev_run:
                raise ValueError(
                    f"trainer.max_epochs ({self.trainer.max_epochs}) leaves no epoch for stage 2 after"
                    f" stage1_epochs ({self.stage1_epochs})"
                )
            self.build(self.trainer.datamodule.tasks, self.trainer.datamodule.train_reports)

    def build(self, tasks, train_reports: list[str]) -> None:
        """Heads, projections and classifier for the findings ``tasks``; the stage-1 weights or (random
        BERT) the vocabulary fitted on ``train_reports``."""
        if not tasks or any(t.num_classes != 2 for t in tasks):
            raise ValueError(f"MUST needs binary findings; the data has {tasks}")
        if self.text_encoder.needs_vocabulary and not self.hparams.stage1_weights:
            self.text_encoder.fit_vocabulary(train_reports)
        with layout_independent_init():
            self.image_head = nn.Linear(self.image_encoder.num_features, len(tasks))
            self.text_head = nn.Linear(self.text_encoder.num_features, len(tasks))
            self.aligned = AlignedEncoders(
                self.image_encoder, self.text_encoder, self.hparams.latent_dim, len(tasks),
                self.settings["stage2"]["projection_init"],
            )  # fmt: skip
        if self.hparams.stage1_weights:
            self._load_stage1(Path(self.hparams.stage1_weights))

    def _load_stage1(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        for name, file in STAGE1_FILES.items():
            if not (directory / file).is_file():
                raise FileNotFoundError(f"stage1_weights: {directory / file} not found")
            getattr(self, name).load_state_dict(
                torch.load(directory / file, map_location="cpu", weights_only=True)
            )
        if (directory / "text_tokenizer").is_dir():
            self.text_encoder.tokenizer = AutoTokenizer.from_pretrained(str(directory / "text_tokenizer"))

    def on_train_epoch_start(self) -> None:
        for optimizer in self.trainer.optimizers:  # each stage's weight decay (official stage 2: none)
            for group in optimizer.param_groups:
                if "decayed" in group:
                    group["weight_decay"] = self.weight_decay(self.stage, group["decayed"])
        if self.current_epoch != self.stage1_epochs:
            return
        if self.stage1_epochs > 0:  # the switch to stage 2
            if self.trainer.is_global_zero:
                self.save_stage1(Path(self.trainer.default_root_dir))
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
        if self.settings["stage2"]["start"] == "stage1_heads":
            self.aligned.anchor_to_heads(self.image_head, self.text_head)

    def save_stage1(self, directory: Path) -> None:
        """Both encoders' and heads' weights (and a fitted vocabulary) as stage 1 left them; never overwrites."""
        for name, file in STAGE1_FILES.items():
            path, state = directory / file, getattr(self, name).state_dict()
            if path.exists():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.keys() == state.keys() and all(
                    torch.equal(saved[k], v.cpu()) for k, v in state.items()
                ):
                    continue  # a resumed run passing the switch again: the same weights are already there
                raise FileExistsError(f"{path} already exists; refusing to overwrite stage-1 weights")
            torch.save(state, path)
        self.text_encoder.save_tokenizer(directory / "text_tokenizer")

    def weight_decay(self, stage: str, matrix: bool) -> float:
        """The weight decay of a group of weight matrices (``matrix``) or of the other parameters (biases,
        norms) in ``stage``: the stage's, or 0 for the others under ``weight_decay_on=matrices``."""
        s = self.settings[stage]
        return s["weight_decay"] if matrix or s["weight_decay_on"] == "all" else 0.0

    # --- the maths -------------------------------------------------------------------------------------
    def targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, known) for BCE_m (``code_labels``): uncertain -> -1 kept as a target (official), 1 / 0,
        or masked per ``uncertain``; unmentioned (missing) -> 0 (official) or masked per ``unmentioned``."""
        return code_labels(labels, self.hparams.uncertain, self.hparams.unmentioned)

    def training_step(self, batch, batch_idx):
        volumes, reports, labels = batch["paired"] if isinstance(batch, dict) else batch
        extra_reports, extra_labels = batch["text_only"] if isinstance(batch, dict) else ([], labels[:0])
        y, known = self.targets(labels)
        if self.stage == "stage1":
            image_loss = masked_bce(self.image_head(self.image_encoder(volumes)), y, known)
            extra_y, extra_known = self.targets(extra_labels)
            texts, text_y = list(reports) + list(extra_reports), torch.cat([y, extra_y])
            text_loss = masked_bce(
                self.text_head(self.text_encoder(texts)), text_y, torch.cat([known, extra_known])
            )
            loss = image_loss + text_loss
            parts = {"train/image_bce": image_loss, "train/text_bce": text_loss}
        else:
            u = self.aligned.image_projection(self.image_encoder(volumes))
            v = self.aligned.text_projection(self.text_encoder(reports))
            contrastive = symmetric_contrastive_loss(u, v)
            bce = 0.5 * (
                masked_bce(self.aligned.classifier(u), y, known)
                + masked_bce(self.aligned.classifier(v), y, known)
            )
            loss = contrastive + bce
            parts = {"train/contrastive": contrastive, "train/shared_bce": bce}
        self.log_dict(parts, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
        log_train_loss(self, loss, len(labels))
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if self.stage == "stage1" else self.settings["stage2"]["gradient_clip_val"]
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        """One AdamW over every part; a part without gradients in a stage (the stage-1 heads in stage 2,
        the projections and classifier in stage 1) is left untouched by it. Per part a group of weight
        matrices and one of the other parameters, their weight decay the stage's (``weight_decay``). lr below,
        stepped per optimiser step (``lr_interval=step``, the official CosineAnnealingLR's scheduler.step() per
        batch) or per epoch; the text side (encoder + head) runs at ``stage1.text_lr`` in stage 1, the shared
        classifier at ``stage2.classifier_lr`` in stage 2 (default: the stage's lr)."""
        projections = [self.aligned.image_projection, self.aligned.text_projection]
        parts = {
            "image": [self.image_encoder, self.image_head, *projections],
            "classifier": [self.aligned.classifier],
            "text": [self.text_encoder, self.text_head],
        }
        groups, schedules = [], []
        for part, modules in parts.items():
            part_groups = decay_param_groups(modules, 0.0)
            for group, matrix in zip(part_groups, (True, False)):  # set to the stage's at each epoch's start
                group["decayed"], group["weight_decay"] = matrix, self.weight_decay(self.stage, matrix)
            groups += part_groups
            schedules += [partial(self.lr_at_epoch, part=part)] * len(part_groups)
        steps = iterations_per_epoch(self) if self.hparams.lr_interval == "step" else None
        return adamw(groups, 1.0, schedules, steps_per_epoch=steps)

    def lr_at_epoch(self, epoch: float, part: str = "image") -> float:
        """At ``epoch`` (steps / steps per epoch under ``lr_interval=step``). Stage 1: cosine lr -> min_lr over
        stage1_epochs; stage 2: cosine lr -> min_lr over the rest (official: none, min_lr = lr);
        scaled by text_lr / lr for the text ``part`` in stage 1, classifier_lr / lr for the classifier
        ``part`` in stage 2."""
        if epoch < self.stage1_epochs:
            s, first, length = self.settings["stage1"], 0, self.stage1_epochs
        else:
            s, first = self.settings["stage2"], self.stage1_epochs
            last = self.trainer.max_epochs if self._trainer else epoch + 1  # outside a Trainer: no schedule
            length = last - self.stage1_epochs
        own_lr = s.get({"text": "text_lr", "classifier": "classifier_lr"}.get(part, "lr")) or s["lr"]
        return own_lr * warmup_cosine_factor(epoch - first, s["lr"], s["lr"], s["min_lr"], 0, length)

    def trained_backbone(self) -> AlignedEncoders:
        return self.aligned

    def export(self, output_dir: Path) -> dict:
        """The whole stage-2 model (both encoders, projections, shared classifier) as ``backbone.pth`` +
        ``backbone.json``, the text tokenizer beside them (``text_tokenizer/``), and each encoder in its
        library's own format: ``image_encoder_torchvision.pth`` (the torchvision VideoResNet's state dict,
        per plane for MRI) and ``text_encoder/`` (a transformers folder: model + tokenizer)."""
        output_dir = Path(output_dir)
        recipe = weights.export(self.aligned, output_dir)
        if not (output_dir / "text_tokenizer").exists():  # stage 1 saved it already in a fresh run
            self.text_encoder.save_tokenizer(output_dir / "text_tokenizer")
        image = self.aligned.image_encoder
        nets = [b.net for b in image.branches] if hasattr(image, "branches") else [image.net]
        torchvision_state = (
            nets[0].state_dict()
            if len(nets) == 1
            else {p: n.state_dict() for p, n in zip(("sagittal", "coronal", "axial"), nets)}
        )
        weights.save_state(torchvision_state, output_dir / "image_encoder_torchvision.pth")
        text_folder = output_dir / "text_encoder"
        if text_folder.exists():
            raise FileExistsError(f"{text_folder} already exists; refusing to overwrite it")
        self.aligned.text_encoder.model.save_pretrained(str(text_folder))
        self.text_encoder.save_tokenizer(text_folder)
        return recipe
