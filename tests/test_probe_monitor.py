"""Watching pre-training (issue #28, callbacks.probe_monitor): a probe every N epochs, logged against epochs,
device-hours and kWh (the loggers, probe_monitor.csv / .png), its AUROC the one a direct computation gives, early
stopping that records the epoch it cut the run at, and a run that trains the same weights with it on or off."""

from __future__ import annotations

import contextlib
import csv
import io
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

import greenlab.callbacks.probe_monitor as probe_monitor
from greenlab.config import build
from greenlab.data.base import ImageDataModule, ItemDataset, Task
from greenlab.evaluation.embeddings import embed
from greenlab.evaluation.linear_probe import knn_probabilities
from greenlab.evaluation.statistics import one_vs_rest_auroc
from tests.toy_method.toy import MeanColour, PatchCNN

# its module-scoped runs are made once: `make test` (pytest-xdist --dist loadgroup) keeps the file on one worker
pytestmark = pytest.mark.xdist_group("probe_monitor")


class Squares(ImageDataModule):
    """96 random 16-px images: task ``bright`` (binary: a bright square in the middle), task ``colour`` (3 classes:
    the raised channel; every 7th unlabelled). 48 pre-train (with random noise, drawn from torch's global
    generator), 32 probe-train, 16 held out."""

    def __init__(self):
        super().__init__(batch_size=8, eval_batch_size=16, num_workers=0, output_dir=None)

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain_set is not None:
            return
        generator, n = torch.Generator().manual_seed(0), 96
        images = torch.rand(n, 3, 16, 16, generator=generator)
        bright, colour = torch.arange(n) % 2, (torch.arange(n) // 2) % 3
        images[bright == 1, :, 4:12, 4:12] += 0.5
        images[torch.arange(n), colour] += 0.3
        labels = torch.stack([bright, colour], 1)
        labels[::7, 1] = -1
        self.tasks = [Task("bright", 2), Task("colour", 3)]

        def subset(indices, transform):
            return ItemDataset(
                [str(i) for i in indices], lambda k: images[indices[k]], labels[indices], transform
            )

        noisy = lambda x: x + 0.05 * torch.randn_like(x)  # noqa: E731
        self.pretrain_set = subset(list(range(48)), noisy)
        self.probe_train_set = subset(list(range(48, 80)), lambda x: x)
        self.probe_test_set = subset(list(range(80, 96)), lambda x: x)


def monitor(tmp_path, **changes):
    return build("callbacks/default", select="probe_monitor", output_dir=str(tmp_path), max_train=20, max_test=12,
                 **changes)  # fmt: skip


def compute_monitor():
    watcher = build("callbacks/default", select="compute_monitor")
    watcher.budget = build("compute/default")
    return watcher


def fit(callbacks: list, epochs: int, logger=False, seed: int = 0) -> tuple[MeanColour, L.Trainer]:
    L.seed_everything(seed, verbose=False)
    objective = MeanColour(PatchCNN(width=8), lr=0.05)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=logger, callbacks=callbacks,
                        log_every_n_steps=1, enable_progress_bar=False,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(objective, datamodule=Squares())
    return objective, trainer


class Modes(L.Callback):
    """Every submodule's train / eval mode at each epoch's start and, after the probe monitor, at its end."""

    def __init__(self):
        self.start, self.end = [], []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start.append([m.training for m in pl_module.modules()])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.end.append([m.training for m in pl_module.modules()])


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """3 epochs, a kNN probe every 2 (so after epochs 2 and 3, the last), a CSV logger and the compute monitor."""
    folder = tmp_path_factory.mktemp("watched")
    watcher, modes = monitor(folder, every_n_epochs=2), Modes()
    logger = CSVLogger(folder, name="csv", version=0)
    objective, trainer = fit([watcher, modes, compute_monitor()], epochs=3, logger=logger)
    return folder, watcher, objective, logger, modes


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_probe_every_n_epochs_and_the_last_to_the_loggers_csv_and_plot(watched):
    folder, watcher, _, logger, modes = watched
    logged = [r for r in read_csv(f"{logger.log_dir}/metrics.csv") if r.get("probe_monitor/auroc_macro")]
    assert [int(float(r["probe_monitor/epoch"])) for r in logged] == [2, 3]
    for key in ("auroc_macro", "auroc_bright", "auroc_colour", "kwh", "device_hours", "step"):
        assert all(math.isfinite(float(r[f"probe_monitor/{key}"])) for r in logged), key
    kwh = [float(r["probe_monitor/kwh"]) for r in logged]
    hours = [float(r["probe_monitor/device_hours"]) for r in logged]
    assert 0 < kwh[0] < kwh[1] and 0 < hours[0] < hours[1]
    assert [int(float(r["probe_monitor/step"])) for r in logged] == [12, 18]  # 6 batches of 8 per epoch
    rows = read_csv(folder / "probe_monitor.csv")
    assert list(rows[0]) == ["epoch", "step", "device_hours", "kwh", "probe_seconds", "auroc_bright",
                             "auroc_colour", "auroc_macro"]  # fmt: skip
    assert [float(r["kwh"]) for r in rows] == kwh and [r["epoch"] for r in rows] == ["2", "3"]
    assert (folder / "probe_monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert modes.end == modes.start  # every submodule back in its own mode after each probe
    assert watcher.stopped_early_at_epoch is None and watcher.deviation() is None
    state = torch.load(io.BytesIO(_saved(watcher.state_dict())), weights_only=True)  # checkpoints load it so
    assert state["history"] == watcher.history


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_the_knn_auroc_is_the_direct_computation_on_the_same_images(watched):
    _, watcher, objective, logger, _ = watched
    fit_set, fit_idx, scored_set, scored_idx = watcher.subsets
    assert fit_set is scored_set and not set(fit_idx) & set(
        scored_idx
    )  # scored on a part of probe-train apart
    assert (len(fit_idx), len(scored_idx)) == (20, 12)
    loader = lambda s, i: DataLoader(Subset(s, list(i)), batch_size=5)  # noqa: E731
    x_fit, y_fit, _ = embed(objective.backbone, loader(fit_set, fit_idx), "mean_all", torch.device("cpu"))
    x_test, y_test, _ = embed(
        objective.backbone, loader(scored_set, scored_idx), "mean_all", torch.device("cpu")
    )
    direct = {}
    for t, name in enumerate(["bright", "colour"]):
        train, test = y_fit[:, t] >= 0, y_test[:, t] >= 0
        classes = np.unique(y_fit[train, t])
        assert len(classes) == (2, 3)[t]  # the stratified draw holds every class
        proba = knn_probabilities(
            x_fit[train], y_fit[train, t], x_test[test], classes, k=20, temperature=0.07
        )
        direct[name] = one_vs_rest_auroc(y_test[test, t], proba, classes)["macro"]
    direct["macro"] = np.mean(list(direct.values()))
    last = [r for r in read_csv(f"{logger.log_dir}/metrics.csv") if r.get("probe_monitor/auroc_macro")][-1]
    for name, value in direct.items():
        assert float(last[f"probe_monitor/auroc_{name}"]) == pytest.approx(value, abs=1e-12), name
    assert 0.5 < direct["macro"] <= 1.0


@pytest.mark.parametrize(
    ("aurocs", "patience", "min_delta", "stopped_at", "best"),
    [
        ([0.70, 0.60, 0.90, 0.95, 0.97, 0.99], 1, 0.0, 2, 0.70),
        # a rise within min_delta is no improvement
        ([0.70, 0.705, 0.90, 0.95, 0.97, 0.99], 1, 0.01, 2, 0.70),
        ([0.50, 0.60, 0.55, 0.58, 0.90, 0.95], 2, 0.0, 4, 0.60),
        ([0.50, 0.60, 0.70, 0.80, 0.90, 0.95], 1, 0.0, None, 0.95),
    ],
)
def test_early_stopping_cuts_the_run_and_records_where(tmp_path, monkeypatch, aurocs, patience, min_delta,
                                                       stopped_at, best):  # fmt: skip
    watcher = monitor(
        tmp_path, every_n_epochs=1, early_stopping={"patience": patience, "min_delta": min_delta}
    )
    values = iter(aurocs)
    monkeypatch.setattr(watcher, "measure", lambda trainer, module: {"macro": next(values)})
    _, trainer = fit([watcher], epochs=6)
    assert trainer.current_epoch == (stopped_at or 6)
    assert watcher.stopped_early_at_epoch == stopped_at
    assert [r["epoch"] for r in read_csv(tmp_path / "probe_monitor.csv")] == [
        str(e) for e in range(1, (stopped_at or 6) + 1)
    ]
    assert watcher.summary()["best_auroc_macro"] == best
    if stopped_at is None:
        assert watcher.deviation() is None and watcher.stop_reason is None
        return
    deviation = watcher.deviation()
    assert (deviation["key"], deviation["paper"], deviation["used"]) == ("trainer.max_epochs", 6, stopped_at)
    assert f"for {patience} probe(s)" in deviation["why"] and "callbacks.probe_monitor" in deviation["why"]
    assert watcher.summary()["stopped_early_at_epoch"] == stopped_at


def test_a_run_resumed_after_early_stopping_stays_stopped(tmp_path, monkeypatch):
    """The monitor's state (curve, patience, the stop) is in every checkpoint and loads with weights_only."""
    changes = {"every_n_epochs": 1, "early_stopping": {"patience": 1, "min_delta": 0.0}}
    first, values = monitor(tmp_path, **changes), iter([0.7, 0.6])
    monkeypatch.setattr(first, "measure", lambda trainer, module: {"macro": next(values)})
    fit([first, ModelCheckpoint(tmp_path / "ckpt", save_last=True)], epochs=6)
    again = monitor(tmp_path, **changes)
    monkeypatch.setattr(again, "measure", lambda trainer, module: pytest.fail("probed after the stop"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, callbacks=[again], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(MeanColour(PatchCNN(width=8), lr=0.05), datamodule=Squares(), ckpt_path=tmp_path / "ckpt" / "last.ckpt",
                weights_only=True)  # fmt: skip
    assert trainer.current_epoch == 2 and again.stopped_early_at_epoch == 2
    assert [r["auroc_macro"] for r in again.history] == [0.7, 0.6] and again.deviation() == first.deviation()


def test_early_stopping_on_the_held_out_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scored_on=probe_train"):
        monitor(tmp_path, scored_on="held_out", early_stopping={"patience": 1, "min_delta": 0.0})


def test_the_same_weights_with_the_monitor_on_or_off(tmp_path, monkeypatch):
    """Off is the default (every_n_epochs: 0): nothing probed, nothing written. On (every epoch), the random states
    are restored after each probe: the same weights; without that restore the probe's loaders would shift the
    pre-training noise (the check has teeth)."""
    off = monitor(tmp_path / "off")
    assert not off.enabled
    trained_off, _ = fit([off], epochs=3)
    assert not (tmp_path / "off").exists()
    trained_on, _ = fit([monitor(tmp_path / "on", every_n_epochs=1)], epochs=3)
    assert len(read_csv(tmp_path / "on" / "probe_monitor.csv")) == 3
    for (name, a), b in zip(trained_off.state_dict().items(), trained_on.state_dict().values()):
        assert torch.equal(a, b), name
    monkeypatch.setattr(probe_monitor, "random_states_kept", contextlib.nullcontext)
    unkept, _ = fit([monitor(tmp_path / "unkept", every_n_epochs=1)], epochs=3)
    assert not all(
        torch.equal(a, b) for a, b in zip(trained_off.state_dict().values(), unkept.state_dict().values())
    )


def test_the_stratified_draw_keeps_each_label_share_in_every_prefix():
    labels = np.repeat([[0], [1], [2]], [60, 30, 10], axis=0)
    order = probe_monitor.stratified_order(labels, np.random.default_rng(0))
    assert sorted(order) == list(range(100))
    for n in (10, 20, 50):
        counts = np.bincount(labels[order[:n], 0], minlength=3)
        assert np.abs(counts - np.array([0.6, 0.3, 0.1]) * n).max() <= 1, (n, counts)
