"""Linear probes on frozen embeddings (RETFound-Green protocol).

Per label task: StandardScaler + L2 logistic regression (lbfgs, C=1, max_iter 20000, random_state 42) fitted
on the probe-train embeddings, scored on the held-out ones. A binary task is one comparison; a multi-class
task one per class (one-vs-rest AUROC) plus their macro mean (greenlab/evaluation/statistics.py). Each
comparison's headline AUROC is the paper's median over ``bootstrap_resamples`` (100) resamples of the
held-out set (seed 42); its 95 % interval comes from ``ci_resamples`` (1,000) resamples of the same stream;
the point estimate on the whole held-out set, AUPRC, accuracy and balanced accuracy are kept beside it. The
resample vectors go to ``bootstrap.npz`` beside results.json, with the held-out ids and labels, for
``python -m greenlab.compare``.

The probe sets are the run's own data (its held-out split) or, with ``datasets``, labelled datasets apart
from the pre-training data, each with its own split and tasks.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from greenlab.evaluation import statistics
from greenlab.evaluation.embeddings import embed
from greenlab.evaluation.statistics import MACRO

log = logging.getLogger(__name__)


def comparisons(record: dict) -> list[tuple[str, dict]]:
    """A scored task record's comparisons: ("macro", the record), then (class, its scores) for each class of a
    multi-class task (the rows of results.md, W&B's probe table and ``greenlab.compare``)."""
    return [(MACRO, record), *record["per_class"].items()]


class LinearProbe:
    """Args: pooling (see ``embeddings.pool``), C / max_iter (logistic regression), bootstrap_resamples
    (the headline median and the saved vectors; 0 = point estimates only), ci_resamples (the 95 % interval),
    seed, bf16 (autocast the embedding pass on GPU), datasets ({key: datamodule}: labelled probe sets, each
    reported under its own ``dataset_name``, e.g. a MedMNIST file's stem; empty: the run's own held-out split)."""

    requires = ()
    optimized_metric = "probe_auroc_macro"

    def __init__(self, pooling: str, C: float, max_iter: int, bootstrap_resamples: int, ci_resamples: int,
                 seed: int, bf16: bool, datasets: dict | None):  # fmt: skip
        self.pooling, self.C, self.max_iter, self.seed, self.bf16 = pooling, C, max_iter, seed, bf16
        self.bootstrap_resamples, self.ci_resamples = bootstrap_resamples, ci_resamples
        self.datasets = list((datasets or {}).values())  # known by their own names (``dataset_name``)

    def __call__(self, backbone: nn.Module, datamodule, device: torch.device) -> dict:
        """Returns {"metrics": {...}, "embedding": {...}, "arrays": {...}} (arrays: bootstrap.npz)."""
        sources = {d.dataset_name: d for d in self.datasets or [datamodule]}
        if len(sources) < len(self.datasets):
            raise ValueError(
                f"evaluation.datasets: two probe sets share a name ({[d.dataset_name for d in self.datasets]})"
            )
        bf16 = self.bf16 and device.type == "cuda"
        tasks, arrays, embedding, started = {}, {}, {}, time.perf_counter()
        for name, source in sources.items():
            source.setup("fit")
            if not source.tasks:
                log.warning("%s has no labels: no linear probes on it", name)
                continue
            train_loader, test_loader = source.probe_dataloaders()
            x_train, y_train, _ = embed(
                backbone, train_loader, self.pooling, device, bf16, f"{name}: probe-train"
            )
            x_test, y_test, seconds = embed(
                backbone, test_loader, self.pooling, device, bf16, f"{name}: held-out"
            )
            arrays[f"ids/{name}"] = np.asarray(source.held_out_ids(), dtype=str)
            arrays[f"labels/{name}"] = y_test
            for t, task in enumerate(tqdm(source.tasks, desc=f"{name}: fitting probes", unit="task")):
                result, draws = self.probe_task(x_train, y_train[:, t], x_test, y_test[:, t])
                tasks[task.name if len(sources) == 1 else f"{name}/{task.name}"] = {
                    "dataset": name, "task": task.name, **result}  # fmt: skip
                arrays.update({f"auroc/{name}/{task.name}/{c}": v for c, v in draws.items()})
            embedding = embedding or self.embedding_record(
                x_test, seconds, test_loader.batch_size, device, bf16
            )
        if not tasks:
            return {"metrics": {"probe_skipped": "no labelled data"}, "embedding": {}}
        scored = [m for m in tasks.values() if not np.isnan(m.get("auroc", np.nan))]
        macro = lambda key: float(np.mean([m[key] for m in scored])) if scored else float("nan")  # noqa: E731
        metrics = {
            "probe_auroc_macro": macro("auroc"),
            "probe_auroc_point_macro": macro("auroc_point"),
            "probe_auprc_macro": macro("auprc"),
            "probe_accuracy_macro": macro("accuracy"),
            "probe_balanced_accuracy_macro": macro("balanced_accuracy"),
            "probe_headline": "bootstrap median" if self.bootstrap_resamples else "point estimate",
            "probe_fit_seconds": time.perf_counter() - started,
            "probe_datasets": {n: s.describe() for n, s in sources.items() if s is not datamodule},
            "probe_tasks": tasks,
        }
        return {"metrics": metrics, "embedding": embedding, "arrays": arrays}

    def embedding_record(self, x: np.ndarray, seconds: float, batch_size: int, device, bf16: bool) -> dict:
        return {
            "dim": int(x.shape[1]),
            "dtype": "float32",
            "bytes_per_image": int(x.shape[1] * 4),
            "pooling": self.pooling,
            "throughput_img_s": float(len(x) / seconds) if seconds > 0 else float("nan"),
            "throughput_method": f"backbone forward only (no data loading), batch {batch_size}, "
            f"{device.type}{', bf16 autocast' if bf16 else ', fp32'}",
        }

    def probe_task(self, x_train, y_train, x_test, y_test) -> tuple[dict, dict[str, np.ndarray]]:
        """Fit on labelled train rows (label >= 0), score on labelled held-out rows. Returns the task's
        record and {comparison: its ``bootstrap_resamples`` AUROC draws}."""
        train, test = y_train >= 0, y_test >= 0
        if len(np.unique(y_train[train])) < 2 or test.sum() == 0:
            skipped = {"skipped": "fewer than two classes in probe-train or no held-out labels"}
            return {**skipped, "n_train": int(train.sum())}, {}
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=42)
        )
        probe.fit(x_train[train], y_train[train])
        y, proba = y_test[test], probe.predict_proba(x_test[test])
        classes, predicted = probe.classes_, probe.classes_[proba.argmax(1)]
        point = statistics.one_vs_rest_auroc(y, proba, classes)
        auprc = statistics.one_vs_rest_auprc(y, proba, classes)
        resamples = max(self.bootstrap_resamples, self.ci_resamples) if self.bootstrap_resamples else 0
        indices = statistics.resample_indices(len(y), resamples, self.seed)
        draws = statistics.bootstrap_auroc(y, proba, classes, indices)
        comparisons = {}
        for key, value in point.items():
            summary = statistics.summarise(draws[key], self.bootstrap_resamples, self.ci_resamples)
            headline = summary["median"] if self.bootstrap_resamples else value
            comparisons[key] = {"auroc": headline, "auroc_point": value, "auroc_ci95": summary["ci95"],
                                "auprc": auprc[key], "resamples_scored": summary["resamples_scored"]}  # fmt: skip
        record = {
            "n_train": int(train.sum()),
            "n_test": int(test.sum()),
            "num_classes": int(len(classes)),
            **comparisons.pop(MACRO),
            "accuracy": float(accuracy_score(y, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "per_class": comparisons,  # one-vs-rest, multi-class tasks only
        }
        return record, {k: v[: self.bootstrap_resamples].astype(np.float32) for k, v in draws.items()}

    def markdown(self, m: dict) -> list[str]:
        headline = m.get("probe_headline", "")
        lines = [
            "",
            f"## Linear probes (AUROC: {headline}; 95% CI from {self.ci_resamples} resamples)",
            "",
            "| dataset | task | class | n train | n test | AUROC [95% CI] | point | AUPRC | bal. acc. |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for task in m["probe_tasks"].values():
            if "skipped" in task:
                lines.append(f"| {task['dataset']} | {task['task']} | | {task.get('n_train', '')} | | "
                             f"skipped: {task['skipped']} | | | |")  # fmt: skip
                continue
            for comparison, row in comparisons(task):
                label = comparison if task["per_class"] else ""  # a binary task: one comparison, no class
                lines.append(
                    f"| {task['dataset']} | {task['task']} | {label} | {task['n_train']} | {task['n_test']} | "
                    f"{_with_ci(row)} | {row['auroc_point']:.3f} | {row['auprc']:.3f} | "
                    + (f"{task['balanced_accuracy']:.3f} |" if row is task else " |")
                )
        lines.append(
            f"| **mean over tasks** | | | | | **{m['probe_auroc_macro']:.3f}** | {m['probe_auroc_point_macro']:.3f} | "
            f"{m['probe_auprc_macro']:.3f} | {m['probe_balanced_accuracy_macro']:.3f} |"
        )
        splits = {n: d.get("split", {}).get("method") for n, d in m.get("probe_datasets", {}).items()}
        lines += [f"\nProbe dataset `{n}`: split {method}." for n, method in splits.items()]
        initial = m.get("initial_backbone")
        if initial and "probe_auroc_macro" in initial:
            per_task = ", ".join(
                f"{k} {v['auroc']:.3f}" for k, v in initial["probe_tasks"].items() if "auroc" in v
            )
            lines += [
                "",
                f"Same probes on the backbone **before** pre-training: mean AUROC {initial['probe_auroc_macro']:.3f} ({per_task}).",
            ]
        return lines


def _with_ci(row: dict) -> str:
    ci = row.get("auroc_ci95") or [math.nan, math.nan]
    return f"{row['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
