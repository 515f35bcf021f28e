"""What every image DataModule offers the pipeline: a pre-training set and labelled probe sets.

A sample is ``(image, labels)``: image (C, H, W) float tensor (or (1, D, H, W) for volumes), labels
(T,) int64 with one entry per task, -1 (MISSING) where that image has no label for that task, -2
(UNCERTAIN) where its report is uncertain (report-derived labels).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from greenlab.data import device_augment
from greenlab.data.transforms2d import normalise_batch

log = logging.getLogger(__name__)

MISSING, UNCERTAIN = -1, -2
# where the pre-training augmentations of 2D images run (``data.augment_on``); auto: ``device`` when training on a
# GPU, ``workers`` on a CPU (benchmarks/results/loader_cache_cpu.json, the README's table)
AUGMENT_ON = ("auto", "workers", "device")
AUGMENT_STREAM = 29  # the device draws' SeedSequence key beside the run's seed and the rank


@dataclass(frozen=True)
class Task:
    """One label column: ``num_classes`` == 2 is binary, more is multi-class (ordinal or not)."""

    name: str
    num_classes: int


class ItemDataset(Dataset):
    """``load(i)`` -> PIL image or array, ``transform`` -> tensor; labels (N, T) int64. ``pixels_only``: items are
    the (H, W, C) uint8 pixels as stored instead (``load_pixels(i)``, default the array of ``load(i)``), for
    augmentation on the training device; a batch of them is one ``PixelBatch`` (``load_batch(indices)`` ->
    ((B, H, W, C) uint8, (B, 2) sizes) when given: the cache reads each image straight into its place)."""

    def __init__(self, ids: Sequence[str], load: Callable, labels: torch.Tensor, transform: Callable,
                 load_pixels: Callable | None = None, load_batch: Callable | None = None):  # fmt: skip
        self.ids, self.load, self.labels, self.transform = list(ids), load, labels, transform
        self.load_pixels = load_pixels or (lambda i: np.asarray(self.load(i)))
        self.load_batch = load_batch
        self.pixels_only = False

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        if self.pixels_only:
            pixels = np.require(
                self.load_pixels(index), np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]
            )  # copied if not
            return torch.from_numpy(pixels), self.labels[index]
        return self.transform(self.load(index)), self.labels[index]

    def __getitems__(self, indices: list[int]):
        """A batch's samples (the DataLoader's batched fetch); with ``pixels_only`` and ``load_batch``, the
        ``PixelBatch`` itself."""
        if self.pixels_only and self.load_batch is not None:
            buffers = []

            def allocate(shape: tuple[int, ...]) -> np.ndarray:
                buffers.append(pixel_buffer(shape))
                return buffers[-1].numpy()

            _, sizes = self.load_batch(indices, allocate)
            return PixelBatch(buffers[0], self.labels[indices], torch.from_numpy(sizes))
        return [self[i] for i in indices]


def pixel_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a DataLoader worker, in shared memory (as ``default_collate`` makes its
    batches), so that the batch reaches the training process without another copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    empty = torch.empty(0, dtype=torch.uint8)
    return empty.new(empty._typed_storage()._new_shared(math.prod(shape), device=empty.device)).view(shape)


class PixelBatch(NamedTuple):
    """A batch of stored pixels for augmentation on the device: pixels (B, H, W, C) uint8, image b in
    ``[:sizes[b, 0], :sizes[b, 1]]`` (black beyond); labels (B, T); sizes (B, 2) int64."""

    pixels: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor


def collate_pixels(samples: list[tuple[torch.Tensor, torch.Tensor]] | PixelBatch) -> PixelBatch:
    """(H, W, C) uint8 images of any sizes -> one ``PixelBatch`` (each copied once, into the top-left corner); a
    ``PixelBatch`` already (``ItemDataset.load_batch``) as it is."""
    if isinstance(samples, PixelBatch):
        return samples
    sizes = torch.tensor([image.shape[:2] for image, _ in samples], dtype=torch.int64)
    height, width = sizes.max(0).values.tolist()
    pixels = pixel_buffer((len(samples), height, width, samples[0][0].shape[2]))
    if (sizes != torch.tensor([height, width])).any():
        pixels.zero_()  # black beyond the smaller images
    for b, (image, _) in enumerate(samples):
        pixels[b, : image.shape[0], : image.shape[1]] = image
    return PixelBatch(pixels, torch.stack([labels for _, labels in samples]), sizes)


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
    twice and others not at all that epoch. The resumed batches' augmentations are fresh draws in the workers;
    on the device their generator goes on from its state in the checkpoint (``ImageDataModule.state_dict``)."""

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
        augment_on: str | None = None,
    ):
        super().__init__()
        if augment_on not in (*AUGMENT_ON, None):
            raise ValueError(f"data.augment_on must be one of {AUGMENT_ON}, not {augment_on!r}")
        # as configured (the 2D options' data.augment_on; None: the workers, e.g. volumes' MONAI transforms);
        # ``augment_where``: where they run (auto resolved by train_dataloader; workers after a refused pipeline)
        self.augment_on = augment_on
        self.augment_where: str | None = None
        self._device_refused: str | None = None  # why auto fell back to the workers
        self.pretrain_pipeline = None  # the 2D pre-training transforms (v2), which either place can run
        self._augment_rng: torch.Tensor | None = None  # the device draws' generator state (this rank's own)
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
        collate = None
        if self.pretrain_pipeline is not None:
            self.augment_where = self._where_to_augment()
            self.pretrain_set.pixels_only = self.augment_where == "device"
            collate = collate_pixels if self.pretrain_set.pixels_only else None
        return ResumableLoader(
            self.pretrain_set, self.batch_size, sampler=order, collate_fn=collate, **self._workers()
        )

    def _where_to_augment(self) -> str:
        """``augment_on`` resolved: auto = device on a GPU, workers on a CPU (measured: docs/data.md, loader_cache),
        and workers when the pipeline has a step the device cannot run."""
        if self._device_refused:
            return "workers"
        if self.augment_on != "auto":
            return self.augment_on
        trainer = self.trainer
        on_gpu = trainer.strategy.root_device.type == "cuda" if trainer else torch.cuda.is_available()
        return "device" if on_gpu else "workers"

    def use_pretrain_pipeline(self, pipeline) -> None:
        """The 2D pre-training transforms (``transforms2d.PRETRAIN_TRANSFORMS``): run by the workers or, with
        ``augment_on`` device, on the training device (``device_augment``; a step it cannot run refused now)."""
        if self.augment_on in ("auto", "device"):
            try:
                device_augment.check(pipeline)
            except ValueError as err:
                if self.augment_on == "device":
                    raise
                log.warning("data.augment_on=auto: augmenting in the workers (%s)", err)
                self._device_refused = str(err)
        self.pretrain_pipeline = pipeline

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
            **({"augment_on": {"configured": self.augment_on, "ran_on": self.augment_where,
                               "rule": "auto: device when training on a GPU, workers on a CPU",
                               **({"device_refused": self._device_refused} if self._device_refused else {})}}
               if self.pretrain_pipeline is not None else {}),
        }  # fmt: skip

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches of photographs arrive as uint8 (the loader workers skip the float work): scaled and
        normalised here, on the training device (``transforms2d.normalise_batch``), after the pre-training
        augmentations when they run here (a ``PixelBatch``: ``device_augment``). Other batches pass unchanged."""
        if isinstance(batch, PixelBatch):
            batch = [self.augment_on_device(batch), batch.labels]
        images = batch[0] if isinstance(batch, list | tuple) else None
        if images is None or not torch.is_tensor(images) or images.dtype != torch.uint8:
            return batch
        return type(batch)([normalise_batch(images, self.mean, self.std), *batch[1:]])

    def augment_on_device(self, batch: PixelBatch) -> torch.Tensor:
        """The batch's pre-training augmentations, drawn on this rank's own generator (seeded by the run's seed
        and the rank; the global generator untouched), applied on the batch's device -> (B, C, h, w) uint8."""
        # the CPU generator's state restored after; CUDA's never touched
        with torch.random.fork_rng(devices=[]):
            if self._augment_rng is None:
                seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))  # as EpochOrder
                rank = self.trainer.global_rank if self.trainer else 0
                # a stream of its own: not the model's (same seed) nor another rank's
                stream = np.random.SeedSequence([seed % 2**63, rank, AUGMENT_STREAM]).generate_state(
                    1, np.uint64
                )[0]
                torch.default_generator.manual_seed(int(stream) % 2**63)
            else:
                torch.set_rng_state(self._augment_rng)
            draws = [device_augment.draw(self.pretrain_pipeline, h, w) for h, w in batch.sizes.tolist()]
            self._augment_rng = torch.get_rng_state()
        return device_augment.augment(batch.pixels, draws)

    def state_dict(self) -> dict:
        """Saved in checkpoints: the device draws' generator state, so a resumed run goes on with its stream."""
        return {} if self._augment_rng is None else {"augment_rng": self._augment_rng}

    def load_state_dict(self, state: dict) -> None:
        self._augment_rng = state.get("augment_rng")

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
