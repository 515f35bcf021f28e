"""Stratified k-fold fine-tuning: backbone + classification head, every fold trained from the same start.

For one label task, all labelled images (probe-train and held-out pooled) are split by
``StratifiedKFold(k, shuffle, seed)``; in each fold a fresh copy of the backbone + [global average pool ->
dropout -> linear] head is trained on the other folds and scored on this one after the last epoch
(``selection: last``; nn-MobileNet's own ``official_best_on_scored_fold`` keeps the epoch of best micro F1 on the
scored fold itself, which is optimistic: results.md says so). Metrics per fold and mean ± std: accuracy, AUROC
(binary or macro one-vs-rest), Cohen's kappa (quadratic when ``ordinal``), weighted F1 (the paper's), and
nn-MobileNet's logged micro AUROC (one-hot labels against softmax, flattened) and micro F1 (= accuracy).

The recipe is nn-MobileNet's released ``main.py`` (values and sources in greenlab/conf/evaluation/finetune.yaml):
AdamW (no weight decay on 1-D parameters and biases), the gradient norm clipped to ``clip_grad_norm`` every
step, a per-step linear warm-up from 0 then cosine to ``min_lr``, mixup / CutMix (timm ``Mixup``, switch
0.5, per batch) with label smoothing and soft-target cross-entropy, its augmentation
(``data/transforms2d.finetune_transform``), and an exponential moving average of the weights, which is what is
scored (``--model_ema_eval``). Volumes (MedMNIST 3D) take the same recipe with the data's 3D crops and
augmentation (``fold_transforms``) and no CutMix (timm's cuts a 2D box; recorded as ``finetune_cutmix``).

RETFound's recipe for ViTs (``evaluation=finetune_retfound``; values and sources in its YAML) takes the same
loop with named options, each off (null) in nn-MobileNet's: layer-wise lr decay (``layer_decay``,
``objectives/optim.layer_decay_param_groups``), stochastic depth (``drop_path``, ``set_drop_path``), the lr rule
lr x batch / 256 (``lr_reference_batch``), the global-pool head (``pooling: fc_norm_mean_patch``: the mean patch
token before the final norm, a new LayerNorm, the head initialised with std ``head_init_std``), RETFound's
augmentation (``augmentation: retfound``, ``data/transforms2d.retfound_finetune_transforms``), and the epoch
chosen on a validation part held out of each fold's training images (``selection: best_on_validation``,
``validation_fraction``) by RETFound's score (``retfound_score``).
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm.auto import tqdm

from greenlab.contracts import FoldSource
from greenlab.data.base import ItemDataset
from greenlab.data.transforms2d import FINETUNE_TRANSFORMS
from greenlab.evaluation import label_efficiency
from greenlab.evaluation.embeddings import pool
from greenlab.evaluation.statistics import bootstrap_auroc, one_vs_rest_auroc, resample_indices
from greenlab.objectives.optim import decay_param_groups, layer_decay_param_groups, warmup_cosine_factor
from greenlab.results.model import MACRO, Comparison, Embedding, Evaluated, Predictions

METRICS = ("accuracy", "auroc", "kappa", "f1_weighted", "auroc_micro", "f1_micro")
SELECTIONS = ("last", "official_best_on_scored_fold", "best_on_validation")
POOLINGS = (None, "fc_norm_mean_patch")
EFFICIENCY_RESAMPLES = (
    100  # bootstrap resamples of the pooled out-of-fold predictions per label-efficiency point
)


class Classifier(nn.Module):
    """backbone.forward_features -> pooled vector (the mean patch token, a CNN's average) -> dropout -> linear.

    ``pooling="fc_norm_mean_patch"`` (a timm ViT): RETFound's ``global_pool`` (models_vit.py): the final norm
    removed (``del self.norm``), the mean patch token through a new LayerNorm ``fc_norm`` (eps 1e-6).
    ``head_init_std``: the head's weight drawn from a truncated normal of that std, its bias 0 (main_finetune.py
    ``trunc_normal_(model.head.weight, std=2e-5)``; timm's zero bias); None: torch's ``nn.Linear`` init."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float,
                 pooling: str | None = None, head_init_std: float | None = None):  # fmt: skip
        super().__init__()
        self.backbone, self.dropout, self.head = (
            backbone,
            nn.Dropout(dropout),
            nn.Linear(num_features, num_classes),
        )
        self.fc_norm = None
        if pooling == "fc_norm_mean_patch":
            if not hasattr(backbone, "norm"):
                raise ValueError(
                    "evaluation.pooling=fc_norm_mean_patch needs a timm ViT backbone (its final norm)"
                )
            backbone.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(num_features, eps=1e-6)
        if head_init_std is not None:
            nn.init.trunc_normal_(self.head.weight, std=head_init_std)
            nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        vector = pool(features, "mean_patch", getattr(self.backbone, "num_prefix_tokens", 0))
        if self.fc_norm is not None:
            vector = self.fc_norm(vector)
        return self.head(self.dropout(vector))


def set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth as timm's ``drop_path_rate=rate`` builds it (RETFound main_finetune.py ``--drop_path``):
    block i drops its residual branches with probability ``linspace(0, rate, depth)[i]`` (timm ``DropPath``;
    ``Identity`` at 0), in place."""
    from timm.layers import DropPath

    if not hasattr(vit, "blocks"):
        raise ValueError("evaluation.drop_path needs a timm ViT backbone (blocks)")
    for block, p in zip(vit.blocks, torch.linspace(0, rate, len(vit.blocks)).tolist(), strict=True):
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, DropPath(p) if p > 0 else nn.Identity())


class KFoldFineTune:
    """Args: folds, epochs, batch_size, img_size (None: the data's), lr / min_lr / warmup_epochs (AdamW,
    warm-up + cosine per step), weight_decay (matrices only), clip_grad_norm (None: no clipping),
    head_dropout, label_smoothing, mixup / cutmix (alphas; 0 turns each off), ema_decay (None: score the
    weights themselves), selection (``last`` epoch | ``official_best_on_scored_fold`` | ``best_on_validation``:
    RETFound's score on ``validation_fraction`` of each fold's training images, stratified), task (label column;
    default the first), ordinal (quadratic kappa), seed, bf16 (autocast on GPU), num_workers. A ViT's options
    (None: off): layer_decay (per-layer lr scales), drop_path (stochastic depth rate), lr_reference_batch (lr x
    batch_size / it), pooling, head_init_std (``Classifier``), augmentation (None: the data's
    ``fold_transforms``; a ``transforms2d.FINETUNE_TRANSFORMS`` name for 2D images)."""

    requires = (FoldSource,)
    optimized_metric = "finetune_auroc_mean"

    def __init__(self, folds: int, epochs: int, batch_size: int, img_size: int | None, lr: float, min_lr: float,
                 warmup_epochs: int, weight_decay: float, clip_grad_norm: float | None, head_dropout: float,
                 label_smoothing: float, mixup: float, cutmix: float, ema_decay: float | None, selection: str,
                 task: str | None, ordinal: bool, seed: int, bf16: bool, num_workers: int,
                 layer_decay: float | None, drop_path: float | None, lr_reference_batch: int | None,
                 pooling: str | None, head_init_std: float | None, augmentation: str | None,
                 validation_fraction: float | None, subgroups: list[str], label_fractions: list[float],
                 label_counts: list[int]):  # fmt: skip
        self.label_fractions, self.label_counts = list(label_fractions or []), list(label_counts or [])
        self.subgroups = list(subgroups or [])  # metadata columns scored per value (evaluation/subgroups.py)
        if selection not in SELECTIONS:
            raise ValueError(f"evaluation.selection must be one of {SELECTIONS}, not {selection!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"evaluation.pooling must be one of {POOLINGS}, not {pooling!r}")
        if augmentation is not None and augmentation not in FINETUNE_TRANSFORMS:
            raise ValueError(f"evaluation.augmentation must be null or one of {tuple(FINETUNE_TRANSFORMS)}, "
                             f"not {augmentation!r}")  # fmt: skip
        if selection == "best_on_validation" and not (validation_fraction and 0 < validation_fraction < 1):
            raise ValueError(
                "evaluation.selection=best_on_validation needs evaluation.validation_fraction in (0, 1)"
            )
        self.layer_decay, self.drop_path, self.lr_reference_batch = layer_decay, drop_path, lr_reference_batch
        self.pooling, self.head_init_std, self.augmentation = pooling, head_init_std, augmentation
        self.validation_fraction = validation_fraction
        self.clip_grad_norm, self.selection = clip_grad_norm, selection
        self.folds, self.epochs, self.batch_size, self.img_size = folds, epochs, batch_size, img_size
        self.lr, self.min_lr, self.warmup_epochs, self.weight_decay = lr, min_lr, warmup_epochs, weight_decay
        self.head_dropout, self.label_smoothing, self.mixup, self.cutmix = (
            head_dropout,
            label_smoothing,
            mixup,
            cutmix,
        )
        self.ema_decay, self.task, self.ordinal = ema_decay, task, ordinal
        self.seed, self.bf16, self.num_workers = seed, bf16, num_workers

    def __call__(self, backbone: nn.Module, datamodule, device: torch.device) -> Evaluated:
        """Per-fold and mean ± std metrics, and one ``Comparison``: the task's AUROC, mean over folds."""
        if not datamodule.tasks:
            return Evaluated({"finetune_skipped": "no labelled data"})
        names = [t.name for t in datamodule.tasks]
        column = names.index(self.task) if self.task else 0
        task = datamodule.tasks[column]
        train_tf, eval_tf = self.fold_transforms(datamodule)
        sources = [datamodule.probe_train_set, datamodule.probe_test_set]
        labels = torch.cat([s.labels[:, column] for s in sources]).numpy()
        ids = np.asarray([i for s in sources for i in s.ids], dtype=str)
        labelled = np.flatnonzero(labels >= 0)
        augmented = ConcatDataset([_with_transform(s, train_tf) for s in sources])
        plain = ConcatDataset([_with_transform(s, eval_tf) for s in sources])
        splitter = StratifiedKFold(self.folds, shuffle=True, random_state=self.seed)
        folds, throughput, cases = [], [], []
        split = list(splitter.split(labelled, labels[labelled]))
        for fold, (train_idx, test_idx) in enumerate(split):
            y, proba, img_s, _ = self._fold(backbone, task, column, labels, labelled[train_idx], labelled[test_idx],
                                            augmented, plain, fold, device)  # fmt: skip
            cases.append((labelled[test_idx], y, proba, np.full(len(y), fold)))
            throughput.append(img_s)
            folds.append(self._score(y, proba, task.num_classes))
        metrics = {
            "finetune_task": task.name,
            "finetune_folds": folds,
            "finetune_cutmix": self.cutmix_for(plain),
            "finetune_selection": self.selection,
        }
        if self.selection == "best_on_validation":
            metrics["finetune_validation_fraction"] = self.validation_fraction
        if self.label_fractions or self.label_counts:
            metrics["finetune_label_efficiency"] = {task.name: self.label_efficiency(
                backbone, task, column, labels, labelled, split, augmented, plain, device)}  # fmt: skip
        for name in METRICS:
            values = [f[name] for f in folds]
            metrics[f"finetune_{name}_mean"] = float(np.nanmean(values))
            metrics[f"finetune_{name}_std"] = float(np.nanstd(values))
        embedding = Embedding(
            dim=int(backbone.num_features),
            dtype="float32",
            bytes_per_image=int(backbone.num_features * 4),
            pooling="global average",
            throughput_img_s=float(np.mean(throughput)),
            throughput_method=f"classifier forward on the scored folds (no data loading), {device.type}",
        )
        row = Comparison("finetune", datamodule.dataset_name, task.name, MACRO, metrics["finetune_auroc_mean"],
                         n_test=len(labelled))  # fmt: skip
        rows, y, proba, fold_of = (np.concatenate(parts) for parts in zip(*cases))
        scored = Predictions("finetune", datamodule.dataset_name, task.name,
                             [str(c) for c in range(task.num_classes)], ids[rows], y, proba, fold_of)  # fmt: skip
        return Evaluated(metrics, [row], embedding=embedding, predictions=[scored])

    def _fold(self, backbone, task, column: int, labels, train_rows, test_rows, augmented, plain, fold: int,
              device) -> tuple[np.ndarray, np.ndarray, float, float]:  # fmt: skip
        """Train a fresh copy of ``backbone`` + head on ``train_rows`` (less a validation part when selecting on
        one), score ``test_rows``: (labels, probabilities, scoring img/s, training seconds)."""
        torch.manual_seed(self.seed + fold)
        trained = copy.deepcopy(backbone)
        if self.drop_path is not None:
            set_drop_path(trained, self.drop_path)
        model = Classifier(trained, backbone.num_features, task.num_classes, self.head_dropout, self.pooling,
                           self.head_init_std).to(device)  # fmt: skip
        scored_fold, select_on = Subset(plain, test_rows.tolist()), None
        if self.selection == "official_best_on_scored_fold":
            select_on = scored_fold
        elif self.selection == "best_on_validation":  # stratified, a fresh part in each fold
            train_rows, validation = train_test_split(
                train_rows, test_size=self.validation_fraction, stratify=labels[train_rows],
                random_state=self.seed + fold,
            )  # fmt: skip
            select_on = Subset(plain, validation.tolist())
        started = time.perf_counter()
        scored = self._train(model, Subset(augmented, train_rows.tolist()), column, task.num_classes, device,
                             f"fold {fold + 1}/{self.folds}", select_on)  # fmt: skip
        seconds = time.perf_counter() - started
        return (*self._predict(scored, scored_fold, column, device), seconds)

    def label_efficiency(self, backbone, task, column: int, labels, labelled, split, augmented, plain,
                         device) -> dict:  # fmt: skip
        """{point: {labels, auroc, auroc_ci95, auroc_point_mean, fit_seconds, repeats}} of the same k-fold
        protocol trained on nested, stratified subsets of each fold's training labels (``label_efficiency.subsets``,
        one per fold: the folds are the repeats), scored on the whole fold; AUROC median and interval over
        bootstrap resamples of the pooled out-of-fold predictions, ``fit_seconds`` per fold."""
        chosen = [label_efficiency.subsets(labels[labelled[train_idx]], None, self.label_fractions,
                                           self.label_counts, 1, self.seed + fold)
                  for fold, (train_idx, _) in enumerate(split)]  # fmt: skip
        out = {}
        for point in chosen[0]:
            ys, probas, seconds, counts, points = [], [], 0.0, [], []
            for fold, (train_idx, test_idx) in enumerate(split):
                rows = labelled[train_idx][chosen[fold][point][0]]
                y, proba, _, spent = self._fold(backbone, task, column, labels, rows, labelled[test_idx], augmented,
                                                plain, fold, device)  # fmt: skip
                ys.append(y), probas.append(proba), counts.append(len(rows))
                points.append(one_vs_rest_auroc(y, proba, np.arange(task.num_classes))[MACRO])
                seconds += spent
            y, proba = np.concatenate(ys), np.concatenate(probas)
            indices = resample_indices(len(y), EFFICIENCY_RESAMPLES, self.seed)
            draws = bootstrap_auroc(y, proba, np.arange(task.num_classes), indices)[MACRO]
            out[point] = {"labels": float(np.mean(counts)), **label_efficiency.pooled([draws]),
                          "auroc_point_mean": float(np.nanmean(points)), "fit_seconds": seconds / len(split),
                          "repeats": len(split)}  # fmt: skip
        return out

    @staticmethod
    def figures(results, folder) -> list:
        """finetune_label_efficiency.png: AUROC against the training labels (when asked for)."""
        efficiency = results.metrics.get("finetune_label_efficiency")
        if not efficiency:
            return []
        path = folder / "finetune_label_efficiency.png"
        label_efficiency.plot(efficiency, path, f"{results.experiment}: fine-tuning label efficiency")
        return [path]

    def fold_transforms(self, datamodule) -> tuple:
        """(training, scoring) transforms: the data's ``fold_transforms`` (nn-MobileNet's for photographs, the
        data's own for volumes), or, given ``augmentation``, that 2D pair at ``img_size`` (None: the data's)
        with the data's normalisation."""
        if self.augmentation is None:
            return datamodule.fold_transforms(self.img_size)
        if getattr(datamodule, "is_3d", False):
            raise ValueError(
                f"evaluation.augmentation={self.augmentation} is for 2D images; use null for volumes"
            )
        size = self.img_size or datamodule.img_size
        return FINETUNE_TRANSFORMS[self.augmentation](size, datamodule.mean, datamodule.std)

    @property
    def peak_lr(self) -> float:
        """The lr after warm-up: ``lr``, or ``lr`` x ``batch_size`` / ``lr_reference_batch`` (RETFound
        main_finetune.py: ``args.lr = args.blr * eff_batch_size / 256``)."""
        return self.lr * self.batch_size / self.lr_reference_batch if self.lr_reference_batch else self.lr

    def _autocast(self, device):
        return (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.bf16 and device.type == "cuda"
            else nullcontext()
        )

    def _train(
        self, model: nn.Module, dataset, column: int, num_classes: int, device, desc: str, select_on=None
    ) -> nn.Module:
        """Train ``model`` on ``dataset``; returns the model to score (its EMA when ``ema_decay``): after the
        last epoch, or, given ``select_on``, after the epoch of the best ``selection_score`` on it (the first such
        epoch): the scored fold's micro F1 (nn-MobileNet main.py ``--main_eval f1``), or RETFound's score on the
        validation part (main_finetune.py: ``if max_score < val_score``, ``max_score`` from 0)."""
        from timm.data import Mixup
        from timm.utils import ModelEmaV2

        loader = DataLoader(
            dataset,
            self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=len(dataset) > self.batch_size,
        )
        if self.layer_decay is None:
            groups = decay_param_groups([model], self.weight_decay, model_skip_list=False)  # optim_factory.py
        else:  # RETFound main_finetune.py: lrd.param_groups_lrd(model, wd, model.no_weight_decay(), layer_decay)
            prefix = "backbone." if isinstance(model, Classifier) else ""
            vit = model.backbone if prefix else model
            if not hasattr(vit, "blocks"):
                raise ValueError("evaluation.layer_decay needs a timm ViT backbone (blocks)")
            skip = vit.no_weight_decay() if hasattr(vit, "no_weight_decay") else set()
            groups = layer_decay_param_groups(model, self.weight_decay, self.layer_decay, skip, prefix)
            for group in groups:  # lr_sched.py: param_group["lr"] = lr * param_group["lr_scale"]
                group["lr"] = self.peak_lr * group["lr_scale"]
        optimizer = torch.optim.AdamW(groups, lr=self.peak_lr)
        total, warmup = max(1, self.epochs * len(loader)), self.warmup_epochs * len(loader)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(self.lr_factor, total=total, warmup=warmup)
        )
        cutmix = self.cutmix_for(dataset)
        mix = None
        if self.mixup > 0 or cutmix > 0:
            mix = Mixup(mixup_alpha=self.mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                        label_smoothing=self.label_smoothing, num_classes=num_classes)  # fmt: skip
        ema = ModelEmaV2(model, decay=self.ema_decay) if self.ema_decay else None
        best_score = 0.0 if self.selection == "best_on_validation" else -1.0
        best = None
        for _ in tqdm(range(self.epochs), desc=f"fine-tuning {desc}", unit="epoch"):
            model.train()
            for images, labels in loader:
                images, labels = images.to(device), labels[:, column].to(device)
                targets = None
                if mix is not None and len(images) % 2 == 0:  # timm's Mixup needs an even batch
                    images, targets = mix(images, labels)  # mixed images, smoothed soft targets
                with self._autocast(device):
                    logits = model(images).float()
                if targets is not None:  # timm SoftTargetCrossEntropy
                    loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
                else:
                    loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.clip_grad_norm is not None:  # engine.py: clip_grad_norm_(model.parameters(), 1.0)
                    nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
                optimizer.step()
                schedule.step()
                if ema is not None:
                    ema.update(model)
            if select_on is not None:
                y, proba, _ = self._predict(
                    ema.module if ema is not None else model, select_on, column, device
                )
                score = self.selection_score(y, proba, num_classes)
                if score > best_score:  # main.py: `if max_accuracy < test_stats["f1"]`; RETFound alike
                    best_score, best = score, copy.deepcopy(ema.module if ema is not None else model)
        if best is not None:
            return best
        return ema.module if ema is not None else model

    def selection_score(self, y: np.ndarray, proba: np.ndarray, num_classes: int) -> float:
        """The epoch-selection score: micro F1 (``official_best_on_scored_fold``) or ``retfound_score``."""
        if self.selection == "official_best_on_scored_fold":
            return float(f1_score(y, proba.argmax(1), average="micro"))
        return retfound_score(y, proba, num_classes)

    def cutmix_for(self, dataset) -> float:
        """``cutmix`` for images; 0 for volumes ((C, D, H, W) samples): timm's CutMix cuts a 2D box."""
        return self.cutmix if dataset[0][0].ndim == 3 else 0.0

    def lr_factor(self, step: int, total: int, warmup: int) -> float:
        """Multiplier of ``lr`` at optimiser step ``step``: linear from 0 over ``warmup`` steps, then a half
        cosine to ``min_lr`` at ``total`` (nn-MobileNet / ConvNeXt ``utils.cosine_scheduler``; RETFound
        ``util/lr_sched.adjust_learning_rate`` at epoch = step / steps per epoch). Relative to ``peak_lr``."""
        return warmup_cosine_factor(step, self.peak_lr, 0.0, self.min_lr, warmup, total)

    @torch.no_grad()
    def _predict(
        self, model: nn.Module, dataset, column: int, device
    ) -> tuple[np.ndarray, np.ndarray, float]:
        model.eval()
        ys, probas, seconds = [], [], 0.0
        for images, labels in DataLoader(dataset, self.batch_size, num_workers=self.num_workers):
            start = time.perf_counter()
            with self._autocast(device):
                logits = model(images.to(device)).float()
            seconds += time.perf_counter() - start
            probas.append(logits.softmax(-1).cpu().numpy())
            ys.append(labels[:, column].numpy())
        y, proba = np.concatenate(ys), np.concatenate(probas)
        return y, proba, len(y) / seconds if seconds else float("nan")

    def _score(self, y: np.ndarray, proba: np.ndarray, num_classes: int) -> dict:
        predicted = proba.argmax(1)
        weights = "quadratic" if self.ordinal and num_classes > 2 else None
        return {
            "n_test": int(len(y)),
            "accuracy": float(accuracy_score(y, predicted)),
            "auroc": one_vs_rest_auroc(y, proba, np.arange(num_classes))[MACRO],
            "kappa": float(cohen_kappa_score(y, predicted, weights=weights)),
            "f1_weighted": float(f1_score(y, predicted, average="weighted")),
            "auroc_micro": micro_auroc(y, proba),
            "f1_micro": float(f1_score(y, predicted, average="micro")),
        }

    def markdown(self, results) -> list[str]:
        m = results.metrics
        initial = m.get("initial_backbone") or {}
        folds = len(m["finetune_folds"])
        lines = [
            "",
            f"## Fine-tuning, stratified {folds}-fold cross-validation (task `{m['finetune_task']}`)",
            "",
            *(
                [
                    "**Optimistic**: each fold's epoch was selected by its micro F1 on that same scored fold "
                    "(nn-MobileNet's released selection, `evaluation.selection=official_best_on_scored_fold`).",
                    "",
                ]
                if m.get("finetune_selection") == "official_best_on_scored_fold"
                else []
            ),
            *(
                [
                    f"Each fold's epoch was selected by RETFound's score ((macro F1 + macro AUROC + kappa) / 3) on a "
                    f"stratified {m['finetune_validation_fraction']:.0%} of its training images "
                    "(`evaluation.selection=best_on_validation`).",
                    "",
                ]
                if m.get("finetune_selection") == "best_on_validation"
                else []
            ),
            "| metric | pre-trained (mean ± std) | same protocol before pre-training | difference |",
            "|---|---|---|---|",
        ]
        for name in METRICS:
            if f"finetune_{name}_mean" not in m:  # runs from before the micro metrics
                continue
            mean, std = m[f"finetune_{name}_mean"], m[f"finetune_{name}_std"]
            row = f"| {name} | {mean:.3f} ± {std:.3f} |"
            if f"finetune_{name}_mean" in initial:
                base, base_std = initial[f"finetune_{name}_mean"], initial[f"finetune_{name}_std"]
                row += f" {base:.3f} ± {base_std:.3f} | {mean - base:+.3f} |"
            else:
                row += " | |"
            lines.append(row)
        return lines + label_efficiency.markdown(
            results,
            "finetune_label_efficiency",
            "k-fold fine-tuning on subsets of each fold's training labels",
        )


def micro_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """nn-MobileNet engine.py's AUC: ``roc_auc_score`` of the one-hot labels against the softmax, both
    flattened (N, K) -> (N x K,); NaN when one class is all."""
    onehot = np.eye(proba.shape[1])[y].ravel()
    return float(roc_auc_score(onehot, proba.ravel())) if 0 < onehot.sum() < len(onehot) else float("nan")


def retfound_score(y: np.ndarray, proba: np.ndarray, num_classes: int) -> float:
    """RETFound engine_finetune.py ``evaluate``'s ``score = (f1 + roc_auc + kappa) / 3``: macro F1 over all
    classes (zero when a class is neither true nor predicted), macro one-vs-rest AUROC (the binary AUROC for two
    classes; classes absent from ``y`` skipped, where sklearn would raise), unweighted Cohen's kappa."""
    predicted = proba.argmax(1)
    f1 = f1_score(y, predicted, labels=np.arange(num_classes), average="macro", zero_division=0)
    auroc = one_vs_rest_auroc(y, proba, np.arange(num_classes))[MACRO]
    return float((f1 + auroc + cohen_kappa_score(y, predicted)) / 3)


def _with_transform(dataset: ItemDataset, transform) -> ItemDataset:
    return ItemDataset(dataset.ids, dataset.load, dataset.labels, transform)
