"""Watching pre-training: every few epochs a quick probe of the backbone being trained, against what training has
cost so far.

Every ``every_n_epochs`` epochs (and after the last one) the backbone's embeddings (``evaluation.embeddings.embed``:
eval mode, no gradients) of a fixed labelled subset of the run's probe sets feed a kNN probe (DINO's weighted vote,
``linear_probe.knn_probabilities``) or a logistic regression; each task's one-vs-rest AUROC (a point estimate,
``statistics.one_vs_rest_auroc``) and their macro mean are logged to every Lightning logger beside the epoch, the
step and the pre-training phase's cost so far (device-hours and kWh from ``ComputeMonitor``: summed over the
processes, the probes' own time included), and written to ``probe_monitor.csv`` with a plot of AUROC against kWh,
``probe_monitor.png``, in the run folder.

The subset is drawn once from ``seed`` (an order in which every prefix holds each label combination in about its
share): ``max_train`` images the probe fits on and ``max_test`` it scores. ``scored_on=probe_train`` scores a
disjoint part of probe-train, so no held-out image is seen before the evaluation and early stopping selects
nothing on the test set; ``held_out`` scores the held-out split (watching only: refused with early stopping).

Early stopping (``early_stopping.patience``: a number of probes): training stops when the macro AUROC has not
risen by more than ``min_delta`` over its best for that many probes in a row; ``stopped_early_at_epoch`` and
``stop_reason`` say so (``summary()`` for results.json, ``deviation()`` for the recipe).

Training is not disturbed: rank 0 alone probes (the others wait for its stop decision), each module of the
backbone gets back its own train / eval mode, and the random states (Python, NumPy, torch, CUDA) are restored,
so a run trains the same weights with the monitor on or off.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from greenlab.compute.budget import JOULES_PER_KWH
from greenlab.compute.monitor import ComputeMonitor
from greenlab.evaluation.embeddings import embed
from greenlab.evaluation.linear_probe import knn_probabilities
from greenlab.evaluation.statistics import one_vs_rest_auroc
from greenlab.results.model import MACRO

log = logging.getLogger(__name__)
PROBES = ("knn", "linear")
SCORED_ON = ("probe_train", "held_out")
CSV_FILE, PLOT_FILE = "probe_monitor.csv", "probe_monitor.png"
PREFIX = "probe_monitor/"  # the logged metrics' names


@contextmanager
def random_states_kept():
    """Restore the Python, NumPy, torch and CUDA random states on leaving (a DataLoader iterator alone draws
    its base seed from torch's)."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def modes_kept(module: torch.nn.Module):
    """Give every submodule back its own train / eval mode on leaving (``train()`` would set them all)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All row indices of ``labels`` (N, T) in an order of which every prefix holds each label combination in
    about its share: a random permutation, stably sorted by each row's place within its combination over the
    combination's size (no label columns: the permutation)."""
    n = len(labels)
    order = rng.permutation(n)
    if labels.ndim < 2 or labels.shape[1] == 0:
        return order
    _, group = np.unique(labels[order].reshape(n, -1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    counts, seen, place = np.bincount(group), np.zeros(group.max() + 1, int), np.empty(n)
    for i, g in enumerate(group):
        place[i] = (seen[g] + 0.5) / counts[g]
        seen[g] += 1
    return order[np.argsort(place, kind="stable")]


def dataset_labels(dataset) -> np.ndarray:
    """(N, T) labels of a probe set: its ``labels`` table where it has one, else read item by item."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]
        labels = torch.stack([torch.as_tensor(y) for y in labels])
    return np.asarray(labels).reshape(len(dataset), -1)


class ProbeMonitor(L.Callback):
    """Args: every_n_epochs (0: off), probe (``knn``: k, temperature | ``linear``: C, max_iter), pooling and bf16
    (the embedding, ``embeddings.embed``), max_train / max_test (the fixed subset's sizes), scored_on
    (``probe_train`` | ``held_out``), early_stopping ({patience: probes without improvement, null: never;
    min_delta}), seed (the subset's draw), output_dir (where the CSV and the plot go)."""

    def __init__(self, every_n_epochs: int, probe: str, k: int, temperature: float, C: float, max_iter: int,
                 pooling: str, bf16: bool, max_train: int, max_test: int, scored_on: str, early_stopping: dict,
                 seed: int, output_dir: str):  # fmt: skip
        if probe not in PROBES:
            raise ValueError(f"callbacks.probe_monitor.probe must be one of {PROBES}, not {probe!r}")
        if scored_on not in SCORED_ON:
            raise ValueError(
                f"callbacks.probe_monitor.scored_on must be one of {SCORED_ON}, not {scored_on!r}"
            )
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(
                f"callbacks.probe_monitor.every_n_epochs must be an integer >= 0, not {every_n_epochs!r}"
            )
        early_stopping = dict(early_stopping or {})
        self.patience = early_stopping.get("patience")
        self.min_delta = float(early_stopping.get("min_delta") or 0.0)
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"callbacks.probe_monitor.early_stopping.patience must be an integer >= 1 or null, "
                             f"not {self.patience!r}")  # fmt: skip
        if self.patience is not None and scored_on == "held_out":
            raise ValueError("callbacks.probe_monitor: early stopping on the held-out AUROC would choose the run's "
                             "length on its test set; use scored_on=probe_train")  # fmt: skip
        self.every_n_epochs, self.probe, self.scored_on = every_n_epochs, probe, scored_on
        self.k, self.temperature, self.C, self.max_iter = k, temperature, C, max_iter
        self.pooling, self.bf16, self.max_train, self.max_test = pooling, bf16, max_train, max_test
        self.seed, self.output_dir = seed, Path(output_dir)
        # one row per probe: epoch, step, device_hours, kwh, probe_seconds (the monitor's own wall time before this
        # probe, counted in that device_hours and kwh: subtract it for training alone), auroc_<task>, auroc_macro
        self.history: list[dict] = []
        self.best, self.best_epoch, self.wait = -math.inf, None, 0
        self.stopped_early_at_epoch: int | None = None  # epochs trained when early stopping ended the run
        self.stop_reason: str | None = None
        self.planned_epochs: int | None = None
        self.probe_seconds = 0.0
        # (fit set, its indices, scored set, its indices), drawn on first use
        self.subsets: tuple | None = None
        self.loaders: tuple[DataLoader, DataLoader] | None = None

    @property
    def enabled(self) -> bool:
        return self.every_n_epochs > 0

    # --- the schedule -------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.planned_epochs = self.planned_epochs or trainer.max_epochs
        if self.stopped_early_at_epoch is not None:  # resumed after early stopping ended it: it stays ended
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1  # epochs trained
        last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch
        if not self.enabled or not (epoch % self.every_n_epochs == 0 or last):
            return
        if (
            trainer.world_size > 1
        ):  # the epoch's logged metrics synced on every rank before our collectives: rank
            _ = (
                trainer.callback_metrics
            )  # 0's progress bar already did (a collective the others must meet first)
        device_hours, kwh = self.cost(trainer)  # every rank: reduced over them
        stop, row = False, None
        if trainer.is_global_zero:
            started, before = time.perf_counter(), self.probe_seconds
            aurocs = self.measure(trainer, pl_module)
            row = {"epoch": epoch, "step": trainer.global_step, "device_hours": device_hours, "kwh": kwh,
                   "probe_seconds": before, **{f"auroc_{t}": v for t, v in aurocs.items()}}  # fmt: skip
            self.history.append(row)
            stop = self.judge(epoch, row[f"auroc_{MACRO}"]) and not last
        stop, reason = trainer.strategy.broadcast((stop, self.reason() if stop else None), src=0)
        if stop:
            self.stopped_early_at_epoch, self.stop_reason = epoch, reason
            trainer.should_stop = True
            log.warning(
                "probe monitor: %s; training stops after epoch %d of %s", reason, epoch, trainer.max_epochs
            )
        if row is not None:
            self.to_loggers(trainer, row)
            self.write()
            self.probe_seconds += time.perf_counter() - started

    def judge(self, epoch: int, auroc: float) -> bool:
        """Record the probe's macro AUROC; whether early stopping ends training now."""
        if not math.isnan(auroc) and auroc > self.best + self.min_delta:
            self.best, self.best_epoch, self.wait = auroc, epoch, 0
        else:
            self.wait += 1
        return self.patience is not None and self.wait >= self.patience

    def reason(self) -> str:
        every = f"every {self.every_n_epochs} epoch(s)"
        best = f"best {self.best:.4f} after epoch {self.best_epoch}" if self.best_epoch else "no probe scored"
        return (f"callbacks.probe_monitor early stopping: the {self.probe} probe's macro AUROC did not rise by more "
                f"than {self.min_delta} for {self.patience} probe(s) in a row ({every}; {best})")  # fmt: skip

    # --- cost so far ----------------------------------------------------------------------------------------------
    @staticmethod
    def cost(trainer) -> tuple[float, float]:
        """(device-hours, kWh) of the pre-training phase so far: ``ComputeMonitor``'s seconds (the slowest
        process) x devices and joules (summed over the processes); NaN without a ComputeMonitor."""
        monitor = next((c for c in trainer.callbacks if isinstance(c, ComputeMonitor)), None)
        if monitor is None:
            return math.nan, math.nan
        seconds, joules = monitor.spent()
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            joules = trainer.strategy.reduce(
                torch.tensor(joules, dtype=torch.float64, device=device), reduce_op="sum"
            )
            seconds = trainer.strategy.all_gather(
                torch.tensor(seconds, dtype=torch.float64, device=device)
            ).max()
            seconds, joules = float(seconds), float(joules)
        devices = trainer.num_devices * trainer.num_nodes
        return seconds * devices / 3600.0, joules / JOULES_PER_KWH

    # --- the probe ------------------------------------------------------------------------------------------------
    def draw(self, datamodule) -> tuple:
        """(fit set, its indices, scored set, its indices): the fixed subset (``seed``)."""
        rng = np.random.default_rng(self.seed)
        train_set = datamodule.probe_train_set
        train_order = stratified_order(dataset_labels(train_set), rng)
        if self.scored_on == "held_out":
            test_set = datamodule.probe_test_set
            test_order = stratified_order(dataset_labels(test_set), rng)
            return (
                train_set,
                np.sort(train_order[: self.max_train]),
                test_set,
                np.sort(test_order[: self.max_test]),
            )
        n = len(train_order)
        fit = min(self.max_train, round(n * self.max_train / (self.max_train + self.max_test)))
        scored = train_order[fit : fit + self.max_test]
        return train_set, np.sort(train_order[:fit]), train_set, np.sort(scored)

    def measure(self, trainer, pl_module) -> dict[str, float]:
        """{task: AUROC, ..., "macro": their mean over the scored tasks} of the backbone as it is now."""
        datamodule = trainer.datamodule
        if not getattr(datamodule, "tasks", None) or datamodule.probe_train_set is None:
            log.warning("probe monitor: the data has no labelled probe sets; nothing to probe")
            return {MACRO: math.nan}
        if self.loaders is None:
            self.subsets = self.draw(datamodule)
            fit_set, fit_idx, scored_set, scored_idx = self.subsets
            workers = {"num_workers": datamodule.num_workers,
                       "worker_init_fn": getattr(datamodule, "worker_init_fn", None)}  # fmt: skip
            self.loaders = tuple(DataLoader(Subset(s, i.tolist()), datamodule.eval_batch_size, shuffle=False, **workers)
                                 for s, i in ((fit_set, fit_idx), (scored_set, scored_idx)))  # fmt: skip
        backbone = pl_module.trained_backbone()
        bf16 = self.bf16 and pl_module.device.type == "cuda"
        with random_states_kept(), modes_kept(backbone), torch.no_grad():
            x_fit, y_fit, _ = embed(
                backbone, self.loaders[0], self.pooling, pl_module.device, bf16, "probe monitor: fit"
            )
            x_test, y_test, _ = embed(backbone, self.loaders[1], self.pooling, pl_module.device, bf16,
                                      "probe monitor: scored")  # fmt: skip
            aurocs = {t.name: self.task_auroc(x_fit, y_fit[:, i], x_test, y_test[:, i])
                      for i, t in enumerate(datamodule.tasks)}  # fmt: skip
        scored = [v for v in aurocs.values() if not math.isnan(v)]
        return {**aurocs, MACRO: float(np.mean(scored)) if scored else math.nan}

    def task_auroc(
        self, x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
    ) -> float:
        """One task's AUROC (one-vs-rest macro for several classes) on its labelled rows; NaN when probe-train
        has fewer than two classes or nothing scored is labelled."""
        fit, test = y_fit >= 0, y_test >= 0
        classes = np.unique(y_fit[fit])
        if len(classes) < 2 or not test.any():
            return math.nan
        if self.probe == "knn":
            proba = knn_probabilities(x_fit[fit], y_fit[fit], x_test[test], classes, self.k, self.temperature)
        else:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            regression = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter,
                                                                             random_state=self.seed))  # fmt: skip
            proba = regression.fit(x_fit[fit], y_fit[fit]).predict_proba(x_test[test])
        return float(one_vs_rest_auroc(y_test[test], proba, classes)[MACRO])

    # --- what it leaves -------------------------------------------------------------------------------------------
    def to_loggers(self, trainer, row: dict) -> None:
        """The row to every logger, at the current step (its epoch, device-hours and kWh beside the AUROCs, so
        a W&B chart can take any of them as its x-axis)."""
        metrics = {PREFIX + key: float(value) for key, value in row.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def write(self) -> None:
        """``probe_monitor.csv`` (one row per probe) and ``probe_monitor.png`` (AUROC against kWh)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        with (self.output_dir / CSV_FILE).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(self.history)
        self.plot(self.output_dir / PLOT_FILE)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kwh = np.array([r["kwh"] for r in self.history], dtype=float)
        on_kwh = bool(np.isfinite(kwh).all() and kwh.max() > 0)
        x = kwh if on_kwh else np.array([r["epoch"] for r in self.history], dtype=float)
        sizes = (
            f": fitted on {len(self.subsets[1])}, scored on {len(self.subsets[3])}" if self.subsets else ""
        )
        figure, axis = plt.subplots(figsize=(5.2, 3.6))
        tasks = [k for k in self.history[-1] if k.startswith("auroc_") and k != f"auroc_{MACRO}"]
        for key in tasks if len(tasks) > 1 else []:
            axis.plot(x, [r.get(key, math.nan) for r in self.history], linewidth=1, alpha=0.6, label=key[6:])
        macro = [r[f"auroc_{MACRO}"] for r in self.history]
        axis.plot(x, macro, marker="o", color="black", linewidth=2, label="macro")
        for xi, yi, r in zip(x, macro, self.history):
            axis.annotate(f"e{r['epoch']}", (xi, yi), fontsize=6, xytext=(2, 3), textcoords="offset points")
        if self.stopped_early_at_epoch:
            axis.axvline(x[-1], color="red", linestyle=":", linewidth=1, label="early stop")
        axis.set(xlabel="pre-training energy so far (kWh)" if on_kwh else "epoch (no energy measured)",
                 ylabel="AUROC", title=f"{self.probe} probe ({self.scored_on}{sizes}), every {self.every_n_epochs} "
                 "epoch(s)")  # fmt: skip
        axis.title.set_fontsize(8)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)

    def deviation(self) -> dict | None:
        """The recipe deviation of a run that early stopping cut short ({key, paper, used, why}), else None."""
        if self.stopped_early_at_epoch is None:
            return None
        return {"key": "trainer.max_epochs", "paper": self.planned_epochs, "used": self.stopped_early_at_epoch,
                "why": self.stop_reason}  # fmt: skip

    def summary(self) -> dict:
        """For results.json: the settings, the probes (the CSV's rows), the best, and whether it stopped the run."""
        return {
            "probe": self.probe, "every_n_epochs": self.every_n_epochs, "scored_on": self.scored_on,
            "fit_images": len(self.subsets[1]) if self.subsets else None,
            "scored_images": len(self.subsets[3]) if self.subsets else None,
            "best_auroc_macro": None if self.best_epoch is None else self.best, "best_epoch": self.best_epoch,
            "planned_epochs": self.planned_epochs, "stopped_early_at_epoch": self.stopped_early_at_epoch,
            "stop_reason": self.stop_reason, "history": self.history,
            "csv": str(self.output_dir / CSV_FILE) if self.history else None,
            "plot": str(self.output_dir / PLOT_FILE) if self.history else None,
        }  # fmt: skip

    def state_dict(self) -> dict:
        """Saved in every checkpoint: a resumed run continues the curve and the patience count."""
        return {"history": self.history, "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "probe_seconds": self.probe_seconds, "planned_epochs": self.planned_epochs,
                "stopped_early_at_epoch": self.stopped_early_at_epoch, "stop_reason": self.stop_reason}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
