"""Linear probes on frozen embeddings (RETFound-Green protocol).

Per label task: StandardScaler + L2 logistic regression (lbfgs, C=1, max_iter 20000, random_state 42) fitted
on the probe-train embeddings, scored on the held-out ones. AUROC is binary, or macro one-vs-rest for
multi-class; besides the point estimate on the whole held-out set, the paper's median of 100 bootstrap
resamples (seed 42) and a 95 % percentile interval are reported.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from greenlab.evaluation.embeddings import embed

log = logging.getLogger(__name__)


def auroc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Binary AUROC, or the macro mean of one-vs-rest AUROCs over classes present and absent in ``y``.

    proba: (N, K) class probabilities, columns in ``classes`` order. NaN when no class is scorable.
    """
    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1])) if len(np.unique(y)) == 2 else float("nan")
    scores = [
        roc_auc_score(y == c, proba[:, k]) for k, c in enumerate(classes) if 0 < (y == c).sum() < len(y)
    ]
    return float(np.mean(scores)) if scores else float("nan")


class LinearProbe:
    """Args: pooling (see ``embeddings.pool``), C / max_iter (logistic regression), bootstrap (resamples,
    0 = none), seed, bf16 (autocast the embedding pass on GPU)."""

    requires = ()
    optimized_metric = "probe_auroc_macro"

    def __init__(self, pooling: str, C: float, max_iter: int, bootstrap: int, seed: int, bf16: bool):
        self.pooling, self.C, self.max_iter, self.bootstrap, self.seed, self.bf16 = (
            pooling,
            C,
            max_iter,
            bootstrap,
            seed,
            bf16,
        )

    def __call__(self, backbone: nn.Module, datamodule, device: torch.device) -> dict:
        """Returns {"metrics": {...}, "embedding": {...}} for results.json."""
        if not datamodule.tasks:
            log.warning("the data has no labels: linear probes skipped")
            return {"metrics": {"probe_skipped": "no labelled data"}, "embedding": {}}
        bf16 = self.bf16 and device.type == "cuda"
        train_loader, test_loader = datamodule.probe_dataloaders()
        x_train, y_train, _ = embed(
            backbone, train_loader, self.pooling, device, bf16, "embedding probe-train"
        )
        x_test, y_test, seconds = embed(
            backbone, test_loader, self.pooling, device, bf16, "embedding held-out"
        )
        tasks, started = {}, time.perf_counter()
        for t, task in enumerate(tqdm(datamodule.tasks, desc="fitting probes", unit="task")):
            tasks[task.name] = self.probe_task(x_train, y_train[:, t], x_test, y_test[:, t])
        scored = [m for m in tasks.values() if "auroc" in m and not np.isnan(m["auroc"])]
        metrics = {
            "probe_auroc_macro": float(np.mean([m["auroc"] for m in scored])) if scored else float("nan"),
            "probe_auroc_bootstrap_median_macro": float(
                np.mean([m.get("auroc_bootstrap_median", np.nan) for m in scored])
            )
            if scored
            else float("nan"),
            "probe_accuracy_macro": float(np.mean([m["accuracy"] for m in scored]))
            if scored
            else float("nan"),
            "probe_fit_seconds": time.perf_counter() - started,
            "probe_tasks": tasks,
        }
        embedding = {
            "dim": int(x_test.shape[1]),
            "dtype": "float32",
            "bytes_per_image": int(x_test.shape[1] * 4),
            "pooling": self.pooling,
            "throughput_img_s": float(len(x_test) / seconds) if seconds > 0 else float("nan"),
            "throughput_method": f"backbone forward only (no data loading), batch {test_loader.batch_size}, "
            f"{device.type}{', bf16 autocast' if bf16 else ', fp32'}",
        }
        return {"metrics": metrics, "embedding": embedding}

    def probe_task(self, x_train, y_train, x_test, y_test) -> dict:
        """Fit on labelled train rows (label >= 0), score on labelled held-out rows."""
        train, test = y_train >= 0, y_test >= 0
        if len(np.unique(y_train[train])) < 2 or test.sum() == 0:
            return {
                "skipped": "fewer than two classes in probe-train or no held-out labels",
                "n_train": int(train.sum()),
            }
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=42)
        )
        probe.fit(x_train[train], y_train[train])
        y, proba = y_test[test], probe.predict_proba(x_test[test])
        classes = probe.classes_
        result = {
            "n_train": int(train.sum()),
            "n_test": int(test.sum()),
            "num_classes": int(len(classes)),
            "auroc": auroc(y, proba, classes),
            "accuracy": float(accuracy_score(y, classes[proba.argmax(1)])),
            "balanced_accuracy": float(balanced_accuracy_score(y, classes[proba.argmax(1)])),
        }
        if self.bootstrap:
            rng = np.random.default_rng(self.seed)
            draws = [
                auroc(y[i], proba[i], classes)
                for i in (rng.integers(0, len(y), len(y)) for _ in range(self.bootstrap))
            ]
            draws = np.array([d for d in draws if not np.isnan(d)])
            result.update(
                auroc_bootstrap_median=float(np.median(draws)) if draws.size else float("nan"),
                auroc_ci95=[float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
                if draws.size
                else None,
                bootstrap_resamples_scored=int(draws.size),
            )
        return result

    def markdown(self, m: dict) -> list[str]:
        lines = [
            "",
            "## Linear probes (held-out split)",
            "",
            "| task | classes | n train | n test | AUROC | bootstrap median [95% CI] | accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, task in m["probe_tasks"].items():
            if "skipped" in task:
                lines.append(f"| {name} | | {task.get('n_train', '')} | | skipped: {task['skipped']} | | |")
                continue
            ci = task.get("auroc_ci95") or [math.nan, math.nan]
            lines.append(
                f"| {name} | {task['num_classes']} | {task['n_train']} | {task['n_test']} | {task['auroc']:.3f} | "
                f"{task.get('auroc_bootstrap_median', math.nan):.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {task['accuracy']:.3f} |"
            )
        lines.append(
            f"| **macro** | | | | **{m['probe_auroc_macro']:.3f}** | {m['probe_auroc_bootstrap_median_macro']:.3f} | "
            f"{m['probe_accuracy_macro']:.3f} |"
        )
        initial = m.get("initial_backbone")
        if initial and "probe_auroc_macro" in initial:
            per_task = ", ".join(
                f"{k} {v['auroc']:.3f}" for k, v in initial["probe_tasks"].items() if "auroc" in v
            )
            lines += [
                "",
                f"Same probes on the backbone **before** pre-training: macro AUROC {initial['probe_auroc_macro']:.3f} ({per_task}).",
            ]
        return lines
