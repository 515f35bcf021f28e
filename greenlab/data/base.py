"""What every image DataModule offers the pipeline: a pre-training set and labelled probe sets.

A sample is ``(image, labels)``: image (C, H, W) float tensor (or (1, D, H, W) for volumes), labels
(T,) int64 with one entry per task, -1 (MISSING) where that image has no label for that task, -2
(UNCERTAIN) where its report is uncertain (report-derived labels).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from greenlab.data.transforms2d import normalise_batch

MISSING, UNCERTAIN = -1, -2


@dataclass(frozen=True)
class Task:
    """One label column: ``num_classes`` == 2 is binary, more is multi-class (ordinal or not)."""

    name: str
    num_classes: int


class ItemDataset(Dataset):
    """``load(i)`` -> PIL image or array, ``transform`` -> tensor; labels (N, T) int64."""

    def __init__(self, ids: Sequence[str], load: Callable, labels: torch.Tensor, transform: Callable):
        self.ids, self.load, self.labels, self.transform = list(ids), load, labels, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.transform(self.load(index)), self.labels[index]


class EpochOrder(DistributedSampler):
    """The pre-training order: this rank's share of a permutation drawn from (run seed, epoch) alone
    (torch's ``DistributedSampler``; one rank on one device), so a resumed run replays the interrupted run's
    order. ``skip``: samples of the next epoch iterated that are left out, those already trained on."""

    def __init__(self, dataset: Dataset, shuffle: bool, epoch: int, ranks: int = 1, rank: int = 0):
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))  # set by L.seed_everything
        super().__init__(dataset, num_replicas=ranks, rank=rank, shuffle=shuffle, seed=seed)
        self.set_epoch(epoch)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """The pre-training DataLoader, resumable mid-epoch by Lightning (``state_dict``/``load_state_dict`` are
    saved in every checkpoint): a run interrupted after ``b`` batches of epoch ``e`` resumes with the rest of
    epoch ``e``'s order (``EpochOrder``), where a plain DataLoader starts a new shuffle and trains some images
    twice and others not at all that epoch. The resumed batches' augmentations are fresh draws."""

    delivered = 0  # batches of the current epoch handed to the training loop (Lightning prefetches none)

    def __iter__(self) -> Iterator:
        self.delivered = 0
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict:
        """The epoch and the samples of its order trained on (in samples: a resume may change the batch)."""
        return {"epoch": getattr(self.sampler, "epoch", None), "samples": self.delivered * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Other samplers (draws with replacement) have no order to replay."""
        if isinstance(self.sampler, EpochOrder) and state["epoch"] == self.sampler.epoch:
            self.sampler.skip = state["samples"] if state["samples"] < len(self.sampler) else 0


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses fill ``pretrain_set``, ``probe_train_set``, ``probe_test_set`` and ``tasks``
    in ``setup``. ``probe_*`` sets use the deterministic evaluation transform."""

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        output_dir: str | None,
        shuffle: bool = True,
    ):
        super().__init__()
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.shuffle = shuffle  # the pre-training order (False: dataset order, e.g. to compare with DDP)
        self.output_dir = Path(output_dir) if output_dir else None
        self.tasks: list[Task] = []
        self.pretrain_set: Dataset | None = None
        self.probe_train_set: Dataset | None = None
        self.probe_test_set: Dataset | None = None
        self.split: dict = {}  # how the held-out images were chosen (greenlab/data/splits.py), for results.json
        # the patient of each probe-train item (None: one per item), for label-efficiency subsets
        self.train_groups: list[str] | None = None
        self.item_metadata: dict[str, dict] = {}  # {item id: {column: value}}, for evaluation.subgroups

    worker_init_fn = None  # a DataLoader worker_init_fn (None: Lightning seeds the workers)

    def train_dataloader(self) -> ResumableLoader:
        """Resumable in the epoch Lightning will run next (the one a checkpoint left unfinished)."""
        trainer = self.trainer
        order = EpochOrder(
            self._present(self.pretrain_set),
            self.shuffle,
            epoch=trainer.fit_loop.epoch_progress.current.processed if trainer else 0,
            ranks=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        return ResumableLoader(self.pretrain_set, self.batch_size, sampler=order, **self._workers())

    def probe_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        """(probe-train, held-out) loaders, in a fixed order."""
        return (
            self._loader(self.probe_train_set, self.eval_batch_size, shuffle=False),
            self._loader(self.probe_test_set, self.eval_batch_size, shuffle=False),
        )

    def describe(self) -> dict:
        """Sizes and tasks, for results.json."""
        size = lambda ds: None if ds is None else len(ds)  # noqa: E731
        return {
            "name": type(self).__name__,
            "pretrain_images": size(self.pretrain_set),
            "probe_train_images": size(self.probe_train_set),
            "probe_test_images": size(self.probe_test_set),
            "dataset": self.dataset_name,
            "tasks": [{"name": t.name, "num_classes": t.num_classes} for t in self.tasks],
            "split": self.split,
        }

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches of photographs arrive as uint8 (the loader workers skip the float work): scaled and
        normalised here, on the training device (``transforms2d.normalise_batch``). Other batches pass unchanged."""
        images = batch[0] if isinstance(batch, list | tuple) else None
        if images is None or not torch.is_tensor(images) or images.dtype != torch.uint8:
            return batch
        return type(batch)([normalise_batch(images, self.mean, self.std), *batch[1:]])

    def held_out_ids(self) -> list[str]:
        """The held-out images' ids, in the order of the held-out loader (``greenlab.compare`` checks them)."""
        return list(self.probe_test_set.ids)

    @property
    def dataset_name(self) -> str:
        """The name evaluations and ``greenlab.compare`` know this data by (a file's or folder's name)."""
        return type(self).__name__

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self._present(dataset), batch_size, shuffle=shuffle, **self._workers())

    def _present(self, dataset: Dataset | None) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        return dataset

    def _workers(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "worker_init_fn": self.worker_init_fn,
        }

    def write_skip_list(self, skipped: list[tuple[str, str]], filename: str = "skipped_inputs.csv") -> Path:
        """Write (path, reason) rows to the run's output directory; returns the file written."""
        directory = self.output_dir or Path.cwd()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / filename
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)
        return path
