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
from the pre-training data, each with its own split and tasks. ``preprocessing`` says how their photographs
become tensors: ``official`` (RETFound-Green's inference notebooks: the raw photograph resized to the input
size, aspect squashed, no crop) or ``greenlab`` (the field-of-view crop, padded square); data that offers no
such choice (``use_probe_preprocessing``: MedMNIST arrays, CT volumes) keeps its own, and results.json says so.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from greenlab.evaluation import label_efficiency, statistics
from greenlab.evaluation.embeddings import embed
from greenlab.results.model import (
    MACRO,
    Comparison,
    Embedding,
    Evaluated,
    HeldOut,
    Predictions,
    probe_comparisons,
)

log = logging.getLogger(__name__)
PREPROCESSING = ("official", "greenlab")
MAPS = ("pca", "umap", None)
MAP_POINTS = 2000  # held-out embeddings drawn in the map at most (the first ones)
OWN = "the data's own (it offers no choice)"


def knn_probabilities(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, classes: np.ndarray, k: int,
                      temperature: float) -> np.ndarray:  # fmt: skip
    """(N_test, K) class probabilities of a weighted k-nearest-neighbour vote, as DINO's ``eval_knn``
    (facebookresearch/dino eval_knn.py ``knn_classifier``): embeddings L2-normalised, the k training
    embeddings of highest cosine similarity s, each voting exp(s / temperature) for its class; the votes
    normalised to sum to 1 (DINO takes their argmax)."""
    train = x_train / np.linalg.norm(x_train, axis=1, keepdims=True).clip(1e-12)
    test = x_test / np.linalg.norm(x_test, axis=1, keepdims=True).clip(1e-12)
    similarity = test @ train.T
    k = min(k, len(train))
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(similarity, nearest, 1) / temperature)
    votes = (weights[:, :, None] * (y_train[nearest][:, :, None] == classes[None, None, :])).sum(1)
    return votes / votes.sum(1, keepdims=True)


class LinearProbe:
    """Args: pooling (see ``embeddings.pool``), C / max_iter (logistic regression), bootstrap_resamples
    (the headline median and the saved vectors; 0 = point estimates only), ci_resamples (the 95 % interval),
    seed, bf16 (autocast the embedding pass on GPU), preprocessing (``official`` | ``greenlab``: how photographs
    become tensors, see the module docstring), datasets ({key: datamodule}: labelled probe sets, each reported
    under its own ``dataset_name``, e.g. a MedMNIST file's stem; empty: the run's own held-out split), knn
    (None, or {k, temperature}: a weighted kNN probe beside each logistic regression, ``knn_probabilities``,
    scored the same way as comparisons of evaluation ``knn_probe``), label_fractions / label_counts /
    label_repeats (label efficiency: the regression refitted on nested, stratified, patient-whole subsets of each
    task's training labels, ``label_efficiency.py``; empty lists: none)."""

    requires = ()
    described_once = ("probe_datasets", "probe_embedding_map")  # metrics left out of ``initial_backbone``
    optimized_metric = "probe_auroc_macro"

    def __init__(self, pooling: str, C: float, max_iter: int, bootstrap_resamples: int, ci_resamples: int,
                 seed: int, bf16: bool, preprocessing: str, datasets: dict | None, knn: dict | None,
                 label_fractions: list[float], label_counts: list[int], label_repeats: int,
                 subgroups: list[str], embedding_map: str | None):  # fmt: skip
        if embedding_map not in MAPS:
            raise ValueError(f"evaluation.embedding_map must be one of {MAPS}, not {embedding_map!r}")
        self.embedding_map = embedding_map
        self.subgroups = list(subgroups or [])  # metadata columns scored per value (evaluation/subgroups.py)
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"evaluation.preprocessing must be official or greenlab, not {preprocessing!r}")
        self.pooling, self.C, self.max_iter, self.seed, self.bf16 = pooling, C, max_iter, seed, bf16
        self.preprocessing = preprocessing
        self.bootstrap_resamples, self.ci_resamples = bootstrap_resamples, ci_resamples
        self.datasets = list((datasets or {}).values())  # known by their own names (``dataset_name``)
        self.knn = dict(knn) if knn else None
        self.label_fractions, self.label_counts = list(label_fractions or []), list(label_counts or [])
        self.label_repeats = label_repeats

    def __call__(self, backbone: nn.Module, datamodule, device: torch.device) -> Evaluated:
        """The probes' metrics, one ``Comparison`` per task / class (with its bootstrap draws), the held-out
        sets and the embedding."""
        sources = {d.dataset_name: d for d in self.datasets or [datamodule]}
        if len(sources) < len(self.datasets):
            raise ValueError(
                f"evaluation.datasets: two probe sets share a name ({[d.dataset_name for d in self.datasets]})"
            )
        bf16 = self.bf16 and device.type == "cuda"
        tasks, rows, held_out, embedding, started = {}, [], {}, None, time.perf_counter()
        predictions, knn_tasks, efficiency, embedding_map = [], {}, {}, None
        preprocessed = {}
        for name, source in sources.items():
            preprocessed[name] = self.preprocess(source, name)
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
            held_out[name] = HeldOut(np.asarray(source.held_out_ids(), dtype=str), y_test)
            if self.embedding_map and not embedding_map:
                embedding_map = self.project(x_test[:MAP_POINTS], y_test[:MAP_POINTS], source.tasks, name)
            for t, task in enumerate(tqdm(source.tasks, desc=f"{name}: fitting probes", unit="task")):
                key = task.name if len(sources) == 1 else f"{name}/{task.name}"
                if self.label_fractions or self.label_counts:
                    groups = getattr(source, "train_groups", None)
                    efficiency[key] = self.label_efficiency(
                        x_train, y_train[:, t], x_test, y_test[:, t], groups
                    )
                probes = [("linear_probe", tasks, self.probe_task)]
                probes += [("knn_probe", knn_tasks, self.knn_task)] if self.knn else []
                for evaluation, records, probe in probes:
                    result, draws, scored = probe(x_train, y_train[:, t], x_test, y_test[:, t])
                    record = {"dataset": name, "task": task.name, **result}
                    records[key] = record
                    if not scored:
                        continue
                    test, proba, classes = scored
                    predictions.append(Predictions(evaluation, name, task.name, [str(c) for c in classes],
                                                   held_out[name].ids[test], y_test[test, t], proba))  # fmt: skip
                    rows += [Comparison(evaluation, name, task.name, c, r["auroc"], r["auroc_ci95"], r["auroc_point"],
                                        r["auprc"], record["n_test"], draws.get(c))
                             for c, r in probe_comparisons(record)]  # fmt: skip
            embedding = embedding or self.embedding_record(
                x_test, seconds, test_loader.batch_size, device, bf16
            )
        if not tasks:
            return Evaluated({"probe_skipped": "no labelled data"})
        scored = [m for m in tasks.values() if not np.isnan(m.get("auroc", np.nan))]
        macro = lambda key: float(np.mean([m[key] for m in scored])) if scored else float("nan")  # noqa: E731
        metrics = {
            "probe_auroc_macro": macro("auroc"),
            "probe_auroc_point_macro": macro("auroc_point"),
            "probe_auprc_macro": macro("auprc"),
            "probe_accuracy_macro": macro("accuracy"),
            "probe_balanced_accuracy_macro": macro("balanced_accuracy"),
            "probe_headline": "bootstrap median" if self.bootstrap_resamples else "point estimate",
            "probe_preprocessing": preprocessed,
            "probe_fit_seconds": time.perf_counter() - started,
            "probe_datasets": {n: s.describe() for n, s in sources.items() if s is not datamodule},
            "probe_tasks": tasks,
        }
        if efficiency:
            metrics["probe_label_efficiency"] = efficiency
        if embedding_map:
            metrics["probe_embedding_map"] = embedding_map
        if self.knn:
            scored_knn = [m["auroc"] for m in knn_tasks.values() if not np.isnan(m.get("auroc", np.nan))]
            metrics["knn_auroc_macro"] = float(np.mean(scored_knn)) if scored_knn else float("nan")
            metrics["knn"] = self.knn
            metrics["knn_tasks"] = knn_tasks
        return Evaluated(metrics, rows, held_out, embedding, predictions)

    def preprocess(self, source, name: str) -> str:
        """Give ``source`` this evaluation's photograph preprocessing; returns what its probe sets use."""
        if hasattr(source, "use_probe_preprocessing"):
            source.use_probe_preprocessing(self.preprocessing)
            return self.preprocessing
        if self.preprocessing == "official":
            log.info(
                "%s: evaluation.preprocessing=official is for photographs; its own preprocessing is used",
                name,
            )
        return OWN

    def embedding_record(
        self, x: np.ndarray, seconds: float, batch_size: int, device, bf16: bool
    ) -> Embedding:
        return Embedding(
            dim=int(x.shape[1]),
            dtype="float32",
            bytes_per_image=int(x.shape[1] * 4),
            pooling=self.pooling,
            throughput_img_s=float(len(x) / seconds) if seconds > 0 else float("nan"),
            throughput_method=f"backbone forward only (no data loading), batch {batch_size}, "
            f"{device.type}{', bf16 autocast' if bf16 else ', fp32'}",
        )

    def project(self, x: np.ndarray, y: np.ndarray, tasks, dataset: str) -> dict:
        """The held-out embeddings in 2D (``pca``: scikit-learn's PCA of the standardised embeddings; ``umap``:
        umap-learn, cosine, seed), with each task's labels, for ``embedding_map.png``."""
        x = StandardScaler().fit_transform(x)
        if self.embedding_map == "umap":
            try:
                import umap
            except ImportError as err:
                raise ImportError(
                    "evaluation.embedding_map=umap needs umap-learn (pip install umap-learn)"
                ) from err
            xy = umap.UMAP(metric="cosine", random_state=self.seed).fit_transform(x)
        else:
            xy = PCA(n_components=2, random_state=self.seed).fit_transform(x)
        return {"method": self.embedding_map, "dataset": dataset, "xy": np.round(xy, 4).tolist(),
                "labels": {t.name: y[:, k].tolist() for k, t in enumerate(tasks)}}  # fmt: skip

    @staticmethod
    def figures(results, folder) -> list:
        """label_efficiency.png (AUROC, median and 95 % interval, against the labels used, one line per task) and
        embedding_map.png (the held-out embeddings in 2D, one panel per task coloured by its label)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        projected = results.metrics.get("probe_embedding_map")
        if projected:
            xy, tasks = np.array(projected["xy"]), projected["labels"]
            figure, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2), squeeze=False)
            for axis, (task, labels) in zip(axes[0], tasks.items()):
                labels = np.array(labels)
                for value in np.unique(labels):
                    shown = labels == value
                    axis.scatter(*xy[shown].T, s=6, label="no label" if value < 0 else str(value))
                axis.set(title=task, xticks=[], yticks=[])
                axis.legend(fontsize=6, markerscale=2)
            figure.suptitle(f"{results.experiment}: held-out embeddings of {projected['dataset']} "
                            f"({projected['method'].upper()})", fontsize=9)  # fmt: skip
            figure.tight_layout()
            figure.savefig(folder / "embedding_map.png", dpi=110)
            plt.close(figure)
            written.append(folder / "embedding_map.png")
        efficiency = results.metrics.get("probe_label_efficiency")
        if efficiency:
            label_efficiency.plot(
                efficiency, folder / "label_efficiency.png", f"{results.experiment}: label efficiency"
            )
            written.append(folder / "label_efficiency.png")
        return written

    def probe_task(
        self, x_train, y_train, x_test, y_test
    ) -> tuple[dict, dict[str, np.ndarray], tuple | None]:
        """Fit on labelled train rows (label >= 0), score on labelled held-out rows. Returns the task's
        record, {comparison: its ``bootstrap_resamples`` AUROC draws} and the scored cases (held-out mask,
        (n, K) probabilities, the K classes; None when skipped)."""
        train, test = y_train >= 0, y_test >= 0
        if len(np.unique(y_train[train])) < 2 or test.sum() == 0:
            return self.skipped(train)
        probe = self.regression().fit(x_train[train], y_train[train])
        return self.score(y_test, test, probe.predict_proba(x_test[test]), probe.classes_, int(train.sum()))

    def regression(self):
        """The probe: StandardScaler + L2 logistic regression (lbfgs, ``C``, ``max_iter``, random_state 42)."""
        return make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=42)
        )

    def knn_task(self, x_train, y_train, x_test, y_test) -> tuple[dict, dict[str, np.ndarray], tuple | None]:
        """As ``probe_task`` with the weighted kNN vote (``knn_probabilities``) instead of the regression."""
        train, test = y_train >= 0, y_test >= 0
        classes = np.unique(y_train[train])
        if len(classes) < 2 or test.sum() == 0:
            return self.skipped(train)
        proba = knn_probabilities(x_train[train], y_train[train], x_test[test], classes, **self.knn)
        return self.score(y_test, test, proba, classes, int(train.sum()))

    def label_efficiency(self, x_train, y_train, x_test, y_test, groups: list[str] | None) -> dict:
        """{point: {labels (mean per subset), auroc (median of the pooled draws), auroc_ci95, auroc_point_mean,
        fit_seconds (per subset), repeats}} of the regression refitted on ``label_efficiency.subsets``."""
        test = y_test >= 0
        indices = statistics.resample_indices(int(test.sum()), self.bootstrap_resamples, self.seed)
        out = {}
        for point, chosen in label_efficiency.subsets(y_train, groups, self.label_fractions, self.label_counts,
                                                      self.label_repeats, self.seed).items():  # fmt: skip
            draws, points, seconds = [], [], 0.0
            for subset in chosen:
                started = time.perf_counter()
                probe = self.regression().fit(x_train[subset], y_train[subset])
                proba = probe.predict_proba(x_test[test])
                seconds += time.perf_counter() - started
                y, classes = y_test[test], probe.classes_
                points.append(statistics.one_vs_rest_auroc(y, proba, classes)[MACRO])
                draws.append(statistics.bootstrap_auroc(y, proba, classes, indices)[MACRO])
            out[point] = {"labels": float(np.mean([len(c) for c in chosen])), **label_efficiency.pooled(draws),
                          "auroc_point_mean": float(np.nanmean(points)), "fit_seconds": seconds / len(chosen),
                          "repeats": len(chosen)}  # fmt: skip
        return out

    @staticmethod
    def skipped(train: np.ndarray) -> tuple[dict, dict, None]:
        skipped = {"skipped": "fewer than two classes in probe-train or no held-out labels"}
        return {**skipped, "n_train": int(train.sum())}, {}, None

    def score(self, y_test: np.ndarray, test: np.ndarray, proba: np.ndarray, classes: np.ndarray,
              n_train: int) -> tuple[dict, dict[str, np.ndarray], tuple]:  # fmt: skip
        """The task's record (AUROC headline, interval, point, AUPRC, accuracies), its bootstrap draws and
        the scored cases, from the held-out probabilities ``proba`` of the labelled rows ``test``."""
        y = y_test[test]
        predicted = classes[proba.argmax(1)]
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
            "n_train": n_train,
            "n_test": int(test.sum()),
            "num_classes": int(len(classes)),
            **comparisons.pop(MACRO),
            "accuracy": float(accuracy_score(y, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "per_class": comparisons,  # one-vs-rest, multi-class tasks only
        }
        draws = {k: v[: self.bootstrap_resamples].astype(np.float32) for k, v in draws.items()}
        return record, draws, (test, proba, classes)

    def markdown(self, results) -> list[str]:
        """The probes' own section of results.md (the comparisons are the report's table): per task the
        sizes and accuracies, the mean over tasks, the splits, the backbone before pre-training."""
        m = results.metrics
        lines = [
            "",
            f"## Linear probes (AUROC: {m.get('probe_headline', '')}; 95% CI from {self.ci_resamples} resamples)",
            "",
            "| dataset | task | n train | n test | classes | accuracy | bal. acc. |",
            "|---|---|---|---|---|---|---|",
        ]
        for task in m["probe_tasks"].values():
            if "skipped" in task:
                lines.append(f"| {task['dataset']} | {task['task']} | {task.get('n_train', '')} | | | "
                             f"skipped: {task['skipped']} | |")  # fmt: skip
                continue
            lines.append(f"| {task['dataset']} | {task['task']} | {task['n_train']} | {task['n_test']} | "
                         f"{task['num_classes']} | {task['accuracy']:.3f} | {task['balanced_accuracy']:.3f} |")  # fmt: skip
        lines += [
            "",
            f"Mean over tasks: AUROC **{m['probe_auroc_macro']:.3f}** (point {m['probe_auroc_point_macro']:.3f}), "
            f"AUPRC {m['probe_auprc_macro']:.3f}, balanced accuracy {m['probe_balanced_accuracy_macro']:.3f}.",
        ]
        if "knn_auroc_macro" in m:
            lines += [f"\nkNN probe (k {m['knn']['k']}, temperature {m['knn']['temperature']}, DINO's eval_knn): "
                      f"mean AUROC over tasks **{m['knn_auroc_macro']:.3f}** (rows `knn_probe` above)."]  # fmt: skip
        lines += label_efficiency.markdown(
            results, "probe_label_efficiency", "linear probe refitted on subsets of the training labels"
        )
        preprocessed = ", ".join(f"`{n}` {how}" for n, how in m.get("probe_preprocessing", {}).items())
        lines += [f"\nPreprocessing of the probe sets: {preprocessed}."] if preprocessed else []
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
