"""A MedMNIST ``.npz`` file (official keys ``train_images``, ``train_labels``, ``val_*``, ``test_*``), 2D or 3D.

Pre-training uses ``train_images``; probes are fitted on train and evaluated on ``test_*`` when the file
has it, else on ``val_*``. Labels (N, 1) are one multi-class task; (N, K>1) are K binary tasks.
2D images (N, H, W[, 3]) go through the 2D transforms of photographs (``transforms2d``; grey becomes 3 channels, upsampled to
``img_size``); 3D volumes (N, D, H, W) become (1, D, H, W) float tensors scaled to [0, 1], resized to
``volume_size`` when given (trilinear: MedMNIST's 64^3 files at the 28^3 or 32^3 of a CPU budget), then ``crop_size``
(random for training, centred for evaluation; None: whole) and, for training volumes, ``volume_augmentation``
(``transforms3d``), as for CT.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import set_rnd
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from PIL import Image

from greenlab.data.base import ImageDataModule, ItemDataset, Task
from greenlab.data.transforms2d import PRETRAIN_TRANSFORMS, eval_transform, finetune_transforms
from greenlab.data.transforms3d import volume_crops

log = logging.getLogger(__name__)


class MedMNISTDataModule(ImageDataModule):
    """Args: path to the ``.npz``; task_names: names for the label columns (default ``label`` or
    ``label_<k>``); img_size / mean / std / augmentation / augment_on: 2D files, as for photographs; volume_size / crop_size
    / volume_augmentation: 3D files (see the module doc); max_per_split: keep the first n of each split (quick runs)."""

    def __init__(
        self,
        path: str,
        task_names: list[str] | None,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augmentation: str,
        volume_size: list[int] | None,
        crop_size: list[int] | None,
        volume_augmentation: dict | None,
        max_per_split: int | None,
        augment_on: str,
        **loader_kwargs,
    ):
        super().__init__(augment_on=augment_on, **loader_kwargs)
        self.path = Path(path).expanduser()
        self.task_names, self.img_size, self.max_per_split = task_names, img_size, max_per_split
        self.mean, self.std = tuple(mean), tuple(std)
        self.augmentation = augmentation
        self.volume_size, self.crop_size, self.volume_augmentation = (
            volume_size,
            crop_size,
            volume_augmentation,
        )
        self.eval_split: str | None = None
        self.is_3d = False

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain_set is not None:
            return
        arrays = self._read()
        self.eval_split = "test" if "test_images" in arrays else "val"
        labels = {s: self._labels(arrays, s) for s in ("train", self.eval_split)}
        width = labels["train"].shape[1]
        num_classes = max(int(labels[s].max()) + 1 for s in labels)
        if width == 1:
            names = self.task_names or ["label"]
            self.tasks = [Task(names[0], max(2, num_classes))]
        else:
            names = self.task_names or [f"label_{k}" for k in range(width)]
            self.tasks = [Task(n, 2) for n in names]
        train_tf = PRETRAIN_TRANSFORMS[self.augmentation](self.img_size, self.mean, self.std)
        eval_tf = eval_transform(self.img_size, self.mean, self.std)
        if self.is_3d:
            train_tf, eval_tf = self.fold_transforms(None)
            self.worker_init_fn = monai_worker_init_fn  # MONAI's random transforms: seeded per worker
        else:
            self.use_pretrain_pipeline(train_tf)
        self.pretrain_set = self._dataset(arrays, "train", labels["train"], train_tf)
        self.probe_train_set = self._dataset(arrays, "train", labels["train"], eval_tf)
        self.probe_test_set = self._dataset(arrays, self.eval_split, labels[self.eval_split], eval_tf)
        self.split = {
            "method": f"official (probes fit on train, scored on {self.eval_split})",
            "images_train": len(self.probe_train_set),
            "images_held_out": len(self.probe_test_set),
        }
        set_rnd(self.pretrain_set, seed=torch.initial_seed() % 2**32)  # the run's seed, in this process

    def fold_transforms(self, img_size: int | None) -> tuple:
        """(training, scoring) transforms of k-fold fine-tuning: nn-MobileNet's for 2D files; for volumes the
        crops and ``volume_augmentation`` (the pre-training ones: no recipe exists for 3D)."""
        if not self.is_3d:
            return finetune_transforms(img_size or self.img_size, self.mean, self.std)
        crops = volume_crops(self.crop_size, self.volume_augmentation)
        return tuple(VolumeTransform(self.volume_size, chain) for chain in crops)

    @property
    def dataset_name(self) -> str:
        return self.path.stem

    def describe(self) -> dict:
        return {
            **super().describe(),
            "file": str(self.path),
            "eval_split": self.eval_split,
            "is_3d": self.is_3d,
            **(
                {
                    "volume_size": self.volume_size,
                    "crop_size": self.crop_size,
                    "volume_augmentation": self.volume_augmentation,
                }  # fmt: skip
                if self.is_3d
                else {}
            ),
        }

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            raise FileNotFoundError(f"MedMNIST file not found: {self.path}")
        try:
            with np.load(self.path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as err:
            raise ValueError(f"cannot read MedMNIST file {self.path}: {type(err).__name__}: {err}") from err
        for key in ("train_images", "train_labels"):
            if key not in arrays:
                raise ValueError(f"{self.path}: missing key {key!r} (has {sorted(arrays)})")
        if "test_images" not in arrays and "val_images" not in arrays:
            raise ValueError(
                f"{self.path}: needs test_images or val_images for evaluation (has {sorted(arrays)})"
            )
        for key in [k for k in arrays if k.endswith("_images")]:
            arrays[key] = self._pixels(key, arrays[key])
        images = arrays["train_images"]
        if images.ndim == 4 and images.shape[-1] not in (1, 3):
            self.is_3d = True
        elif images.ndim not in (3, 4):
            raise ValueError(
                f"{self.path}: train_images has shape {images.shape}; expected (N,H,W), (N,H,W,C) or (N,D,H,W)"
            )
        return arrays

    def _pixels(self, key: str, images: np.ndarray) -> np.ndarray:
        """uint8 as MedMNIST stores them; float arrays in [0, 1] or [0, 255] are scaled to uint8 (logged), any
        other dtype or range is an error naming the key."""
        if images.dtype == np.uint8:
            return images
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(
                f"{self.path}: {key} has dtype {images.dtype}; expected uint8 (or float in [0, 1])"
            )
        if not np.isfinite(images).all():
            raise ValueError(f"{self.path}: {key} holds NaN or infinite pixels")
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{self.path}: {key} values span [{low:g}, {high:g}]; expected [0, 1] or [0, 255]"
            )
        scale = 255.0 if high <= 1.0 else 1.0
        log.info(
            "%s: %s is %s in [%g, %g], scaled to uint8 x%g",
            self.path.name,
            key,
            images.dtype,
            low,
            high,
            scale,
        )
        return np.round(images * scale).astype(np.uint8)

    def _labels(self, arrays: dict, split: str) -> torch.Tensor:
        labels = arrays.get(f"{split}_labels")
        images = arrays[f"{split}_images"]
        if labels is None or len(labels) != len(images):
            raise ValueError(f"{self.path}: {split}_labels missing or not one row per image")
        labels = np.asarray(labels).reshape(len(labels), -1)
        key = f"{split}_labels"
        if labels.dtype == np.uint8 and (labels == 255).any():
            raise ValueError(f"{self.path}: {key} holds 255 in a uint8 array: a -1 (no label) stored unsigned? "
                             "store labels as signed integers, -1 for none")  # fmt: skip
        if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
            raise ValueError(f"{self.path}: {key} has dtype {labels.dtype}; expected integer class labels")
        if np.issubdtype(labels.dtype, np.floating) and not np.all(
            np.isnan(labels) | (labels == np.round(labels))
        ):
            bad = labels[~np.isnan(labels) & (labels != np.round(labels))][0]
            raise ValueError(
                f"{self.path}: {key} holds {float(bad):g}; expected integer class labels (-1 for none)"
            )
        labels = np.nan_to_num(labels, nan=-1)
        if (labels < -1).any():
            raise ValueError(
                f"{self.path}: {key} holds {float(labels.min()):g}; class labels are >= 0, -1 for none"
            )
        labels = torch.as_tensor(labels.astype(np.int64))
        return labels[: self.max_per_split] if self.max_per_split else labels

    def _dataset(self, arrays: dict, split: str, labels: torch.Tensor, transform) -> ItemDataset:
        images = (
            arrays[f"{split}_images"][: self.max_per_split]
            if self.max_per_split
            else arrays[f"{split}_images"]
        )
        load = (lambda i: images[i]) if self.is_3d else (lambda i: _to_rgb(images[i]))
        return ItemDataset([f"{split}_{i}" for i in range(len(images))], load, labels, transform)


def _to_rgb(array: np.ndarray) -> Image.Image:
    array = array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array
    return Image.fromarray(array).convert("RGB")


class VolumeTransform:
    """A stored (D, H, W) volume -> (1, D, H, W) float in [0, 1] -> resized to ``size`` (trilinear; None: kept)
    -> ``chain`` on {"image"} (crops and augmentation; a class, not a closure, so that MONAI's ``set_rnd``
    finds and seeds its random transforms)."""

    def __init__(self, size: list[int] | None, chain):
        self.size, self.chain = size, chain

    def __call__(self, volume: np.ndarray) -> torch.Tensor:
        scale = 255.0 if volume.dtype == np.uint8 else 1.0
        image = torch.as_tensor(volume, dtype=torch.float32).unsqueeze(0) / scale
        if self.size is not None:
            image = F.interpolate(image[None], size=tuple(self.size), mode="trilinear", align_corners=False)[
                0
            ]
        return self.chain({"image": image})["image"]
