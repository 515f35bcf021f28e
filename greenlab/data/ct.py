"""CT volumes, NIfTI files or DICOM series folders, listed in a CSV manifest, prepared with MONAI.

Deterministic part (cached on disk with ``monai.data.PersistentDataset``): load -> channel first ->
orientation RAS -> resample to ``spacing`` mm (bilinear) -> HU window [lo, hi] mapped to [-1, 1], clipped
-> pad (with air, -1) / crop to ``pad_size``. Then a random ``crop_size`` crop for training, the centre
crop for evaluation (GreenRFM chest CT: 1.5 x 1.5 x 3 mm, [-1000, 200] HU, 240x240x120, crops 192x192x96).

Every volume is checked once in ``setup`` (which also fills the cache): unreadable, NaN/inf, not 3D, or
without a usable spacing is an error naming the file, or, with ``skip_bad``, a row in skipped_inputs.csv.
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai import transforms as mt
from monai.data import PersistentDataset
from tqdm.auto import tqdm

from greenlab.data.base import ImageDataModule, Task, held_out

log = logging.getLogger(__name__)


def ct_preprocessing(
    spacing=(1.5, 1.5, 3.0), hu_window=(-1000.0, 200.0), pad_size=(240, 240, 120)
) -> mt.Compose:
    """The deterministic, cacheable part: {"image": path} -> {"image": (1, X, Y, Z) float in [-1, 1]}."""
    return mt.Compose(
        [
            mt.LoadImaged("image", ensure_channel_first=True, image_only=True),
            CheckVolumed("image"),
            mt.Orientationd("image", axcodes="RAS"),
            mt.Spacingd("image", pixdim=tuple(spacing), mode="bilinear"),
            mt.ScaleIntensityRanged(
                "image", a_min=hu_window[0], a_max=hu_window[1], b_min=-1.0, b_max=1.0, clip=True
            ),
            mt.ResizeWithPadOrCropd("image", spatial_size=tuple(pad_size), constant_values=-1.0),
        ]
    )


def ct_crop(crop_size=(192, 192, 96), train: bool = True) -> mt.Compose:
    crop = (
        mt.RandSpatialCropd("image", roi_size=tuple(crop_size), random_size=False)
        if train
        else mt.CenterSpatialCropd("image", roi_size=tuple(crop_size))
    )
    return mt.Compose([crop, mt.ToTensord("image", track_meta=False)])


class CheckVolumed(mt.MapTransform):
    """Refuse volumes that are not 3D, hold NaN/inf, or have no usable voxel spacing; the error names the file."""

    def __call__(self, data):
        image = data[self.keys[0]]
        source = image.meta.get("filename_or_obj", "?") if hasattr(image, "meta") else "?"
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"{source}: expected one 3D volume, got shape {tuple(image.shape)}")
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise ValueError(f"{source}: volume holds NaN or infinite values")
        spacing = _header_spacing(image, str(source))
        if spacing is None or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(f"{source}: no usable voxel spacing in its header (got {spacing})")
        return data


def _header_spacing(image, source: str) -> np.ndarray | None:
    """Voxel spacing as the file states it. nibabel silently turns a zero NIfTI spacing into 1 mm, so
    NIfTI is read from the raw header; a DICOM series needs its PixelSpacing tag (0028,0030)."""
    if source.endswith((".nii", ".nii.gz")):
        return _raw_nifti_spacing(source)
    meta = getattr(image, "meta", {})
    if "00200037" in meta and "00280030" not in meta:  # DICOM geometry without pixel spacing
        return None
    return np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)


def _raw_nifti_spacing(path: str) -> np.ndarray:
    """pixdim[1:4] as stored in a NIfTI-1 (348-byte header, float32) or NIfTI-2 (540, float64) file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.read(540)
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348:
            return np.array(struct.unpack(order + "8f", header[76:108])[1:4], dtype=float)
        if size == 540:
            return np.array(struct.unpack(order + "8d", header[104:168])[1:4], dtype=float)
    raise ValueError(f"{path}: not a NIfTI-1/2 header")


class CTDataModule(ImageDataModule):
    """Args: manifest (CSV), volume_column (paths relative to the manifest's folder: a NIfTI file or a
    DICOM series folder), report_column (optional free text), label_columns (1/0, -1 uncertain, blank
    missing: uncertain counts as missing here), spacing / hu_window / pad_size / crop_size (see module
    doc), cache_dir (persistent cache of the deterministic part), held_out_fraction / split_seed,
    skip_bad (list bad volumes in skipped_inputs.csv instead of failing)."""

    def __init__(self, manifest: str, volume_column: str = "volume", report_column: str | None = "report",
                 label_columns: list[str] | None = None, spacing=(1.5, 1.5, 3.0), hu_window=(-1000.0, 200.0),
                 pad_size=(240, 240, 120), crop_size=(192, 192, 96), cache_dir: str | None = None,
                 held_out_fraction: float = 0.2, split_seed: int = 42, skip_bad: bool = False, **loader_kwargs):  # fmt: skip
        super().__init__(**loader_kwargs)
        self.manifest = Path(manifest).expanduser()
        self.volume_column, self.report_column, self.label_columns = (
            volume_column,
            report_column,
            label_columns,
        )
        self.preprocess = ct_preprocessing(spacing, hu_window, pad_size)
        self.crop_size, self.cache_dir, self.skip_bad = tuple(crop_size), cache_dir, skip_bad
        self.held_out_fraction, self.split_seed = held_out_fraction, split_seed
        self.reports: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain_set is not None:
            return
        table = self._read_manifest()
        paths = [str((self.manifest.parent / p).resolve()) for p in table[self.volume_column]]
        skipped, keep = [], []
        for row, path in enumerate(tqdm(paths, desc="checking + caching volumes", unit="vol")):
            try:
                self.preprocess({"image": path})
                keep.append(row)
            except Exception as err:
                root = err
                while root.__cause__ is not None:  # MONAI wraps the reason in "applying transform ..."
                    root = root.__cause__
                reason = str(root).splitlines()[0].replace(f"{path}: ", "")
                if not self.skip_bad:
                    raise ValueError(
                        f"{path}: {reason} (set data.skip_bad=true to skip and list such volumes)"
                    ) from err
                skipped.append((path, reason))
        if skipped:
            log.warning("skipped %d volumes; the list is in %s", len(skipped), self.write_skip_list(skipped))
        table = table.iloc[keep].reset_index(drop=True)
        paths = [paths[i] for i in keep]
        columns = self.label_columns or [
            c for c in table.columns if c not in (self.volume_column, self.report_column)
        ]
        self.tasks = [Task(c, 2) for c in columns]
        labels = torch.tensor(
            table[columns].fillna(-1).astype(int).clip(lower=-1).values.reshape(len(table), -1)
        )
        labels[labels == -1] = -1
        self.reports = (
            table[self.report_column].fillna("").tolist()
            if self.report_column in table
            else [""] * len(table)
        )
        items = [{"image": p, "labels": labels[i]} for i, p in enumerate(paths)]
        test = [held_out(p, self.held_out_fraction, self.split_seed) for p in paths]
        train_items = [it for it, t in zip(items, test) if not t]
        test_items = [it for it, t in zip(items, test) if t]
        self.pretrain_set = self._dataset(train_items, train=True)
        self.probe_train_set = self._dataset(train_items, train=False)
        self.probe_test_set = self._dataset(test_items, train=False)

    def _dataset(self, items: list[dict], train: bool):
        crop = ct_crop(self.crop_size, train)
        transform = mt.Compose([self.preprocess, crop, mt.Lambda(lambda d: (d["image"], d["labels"]))])
        if self.cache_dir:
            return PersistentDataset(items, transform=transform, cache_dir=self.cache_dir)
        from monai.data import Dataset

        return Dataset(items, transform=transform)

    def _read_manifest(self) -> pd.DataFrame:
        if not self.manifest.is_file():
            raise FileNotFoundError(f"CT manifest not found: {self.manifest}")
        table = pd.read_csv(self.manifest)
        if self.volume_column not in table.columns:
            raise ValueError(
                f"{self.manifest}: no column {self.volume_column!r} (columns: {list(table.columns)})"
            )
        return table
