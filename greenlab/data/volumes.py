"""Volumes listed in a CSV manifest (NIfTI files or DICOM series folders), prepared by a MONAI chain.

``VolumeDataModule`` is what CT and MRI share: the manifest, labels from its columns or distilled from its
reports, a deterministic held-out split, a check of every volume in ``setup`` (unreadable, NaN/inf, not
3D, or without a usable spacing is an error naming the file, or, with ``skip_bad``, a row in
skipped_inputs.csv), the deterministic ``preprocessing`` chain cached on disk
(``monai.data.PersistentDataset``), then the crops (random for training, centred for evaluation) and, for
training volumes, the 3D augmentation (``greenlab/data/transforms3d.py``).
A modality (``data/ct.py``, ``data/mri.py``) gives only its chains and which manifest columns feed them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai import transforms as mt
from monai.data import Dataset, PersistentDataset
from monai.data.utils import set_rnd
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from tqdm.auto import tqdm

from greenlab.data import splits
from greenlab.data.base import MISSING, UNCERTAIN, ImageDataModule, ResumableLoader, Task
from greenlab.data.transforms3d import volume_crops
from greenlab.labels import label_reports, tables

UNLABELLED_FINDINGS = ("keep", "drop")
log = logging.getLogger(__name__)


SPACING_MM = (0.05, 50.0)  # plausible voxel spacing of a CT / MR scan; outside it the header is wrong
MAX_RESAMPLED_VOXELS = 2**30  # 4 GiB as float32: a resampled size beyond this is refused before allocating


class CheckVolumed(mt.MapTransform):
    """Refuse volumes that are not 3D, hold NaN/inf, have no usable voxel spacing or one outside
    ``SPACING_MM``, or (``target_spacing`` given) would resample to under one voxel along an axis or more than
    ``MAX_RESAMPLED_VOXELS``; the error names the file."""

    def __init__(self, keys, target_spacing=None):
        super().__init__(keys)
        self.target_spacing = None if target_spacing is None else np.asarray(target_spacing, dtype=float)

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
        low, high = SPACING_MM
        if np.any(spacing < low) or np.any(spacing > high):
            raise ValueError(f"{source}: voxel spacing {np.round(spacing, 4).tolist()} mm is outside [{low}, {high}] "
                             "mm: a wrong header (units?)")  # fmt: skip
        if self.target_spacing is not None:
            size = np.floor(np.asarray(image.shape[1:]) * spacing / self.target_spacing).astype(int)
            if size.min() < 1 or size.prod(dtype=float) > MAX_RESAMPLED_VOXELS:
                raise ValueError(f"{source}: {list(image.shape[1:])} voxels at {np.round(spacing, 4).tolist()} mm "
                                 f"resample to {size.tolist()} at {self.target_spacing.tolist()} mm (allowed: >= 1 "
                                 f"per axis, <= {MAX_RESAMPLED_VOXELS:,} in all)")  # fmt: skip
        return data


class CheckSeriesGapsd(mt.MapTransform):
    """{key: path}: a DICOM series folder must have evenly spaced slices (``check_dicom_series``); NIfTI
    files pass. First in the cached chain, so a cached volume is not checked again."""

    def __call__(self, data):
        for key in self.keys:
            if Path(data[key]).is_dir():
                check_dicom_series(Path(data[key]))
        return data


def check_dicom_series(folder: Path) -> None:
    """A DICOM series folder must have evenly spaced slices: a gap (a missing slice) would be interpolated
    over silently. Positions along the slice normal from each file's header; a step more than 1.5 x the
    median step is an error naming the two files around it."""
    import pydicom

    slices = []
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
            position = np.asarray(header.ImagePositionPatient, dtype=float)
            orientation = np.asarray(header.ImageOrientationPatient, dtype=float)
        except Exception:  # not a slice (DICOMDIR, a text file): the reader decides
            continue
        slices.append((float(np.dot(np.cross(orientation[:3], orientation[3:]), position)), file.name))
    if len(slices) < 3:
        return
    slices.sort()
    steps = np.diff([p for p, _ in slices])
    typical = float(np.median(steps))
    worst = int(np.argmax(steps))
    if typical <= 0 or steps.min() <= 0.01 * typical:
        raise ValueError(f"{folder}: two slices at the same position ({slices[int(np.argmin(steps))][1]}, "
                         f"{slices[int(np.argmin(steps)) + 1][1]}): a duplicated or mixed series")  # fmt: skip
    if steps[worst] > 1.5 * typical:
        raise ValueError(f"{folder}: slice gap of {steps[worst]:.2f} mm between {slices[worst][1]} and "
                         f"{slices[worst + 1][1]} (the series steps {typical:.2f} mm): a missing slice")  # fmt: skip


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


def source_stamp(source: dict[str, str]) -> bytes:
    """The cache key of one volume: each source file's path, size and modification time (every file of a
    DICOM series folder). The preprocessing's parameters key the cache folder (``cache_key``)."""
    stamps = []
    for key in sorted(source):
        path = Path(source[key])
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                status = file.stat()
                stamps.append([str(file), status.st_size, status.st_mtime_ns])
    if not stamps:
        raise FileNotFoundError(f"{', '.join(source.values())}: no such file or no files in the folder")
    return hashlib.sha1(json.dumps(stamps).encode()).hexdigest().encode()


class VolumeDataModule(ImageDataModule):
    """Args: manifest (CSV), volumes ({chain key: manifest column}: paths relative to the manifest's folder,
    a NIfTI file or a DICOM series folder; the first column is the study's id), preprocessing (MONAI chain,
    {key: path} -> {"image": tensor}, deterministic: cached), crops ((training, evaluation) chains on
    {"image"}), geometry (the preprocessing's parameters: the cache folder's key), report_column (optional
    free text), label_columns (1 present, 0 absent, -1 uncertain, blank missing; default every other
    column), labeller (distil the labels from the reports instead: a ``greenlab/conf/data/labeller`` object; written
    to report_labels.csv in the run folder and reused from there), pair_reports (training samples are
    (volume, report, labels), for image-text objectives; the pipeline sets it from the objective's
    ``reads_reports``), cache_dir (persistent cache of the deterministic
    part), group_column (patient id: all studies of a patient on one side of the held-out split; None: a
    ``splits.GROUP_COLUMNS`` column when the manifest has one, else by study id), held_out_fraction / split_seed,
    skip_bad (list bad volumes in skipped_inputs.csv instead of failing), text_only_reports (a CSV of more
    reports without a volume, ``report_column``, labelled by the ``labeller``: with ``pair_reports``, each
    training batch is then {"paired": (volumes, reports, labels), "text_only": (reports, labels)}, the
    text-only part ``text_only_batch_size`` reports drawn at random; for training a text encoder alone).

    unlabelled_findings: a finding with no present / absent label in the training split is kept (``keep``, as
    the official data/ct_rate.py and data/merlin.py, which take every label column: a column of zeros once
    unmentioned = 0) or dropped (``drop``, greenlab: no head for a finding nothing teaches); logged either way.

    Label tensors: 1 present, 0 absent, -2 uncertain, -1 missing."""

    def __init__(self, manifest: str, volumes: dict[str, str], preprocessing: mt.Compose, crop_size,
                 volume_augmentation: dict | None, geometry: dict, report_column: str | None,
                 label_columns: list[str] | None, labeller, cache_dir: str | None, group_column: str | None,
                 held_out_fraction: float, split_seed: int, skip_bad: bool, text_only_reports: str | None,
                 text_only_batch_size: int, unlabelled_findings: str, metadata_columns: list[str],
                 pair_reports: bool = False,
                 **loader_kwargs):  # fmt: skip
        super().__init__(**loader_kwargs)
        if unlabelled_findings not in UNLABELLED_FINDINGS:
            raise ValueError(
                f"data.unlabelled_findings must be one of {UNLABELLED_FINDINGS}, not {unlabelled_findings!r}"
            )
        self.unlabelled_findings, self.metadata_columns = unlabelled_findings, list(metadata_columns or [])
        self.manifest = Path(manifest).expanduser()
        self.volumes, self.report_column = dict(volumes), report_column
        self.label_columns, self.labeller, self.pair_reports = label_columns, labeller, pair_reports
        self.preprocess, self.skip_bad = preprocessing, skip_bad
        self.crop_size = None if crop_size is None else list(crop_size)
        self.volume_augmentation = volume_augmentation
        self.crops = volume_crops(crop_size, volume_augmentation)
        self.cache_dir = cache_dir and Path(cache_dir) / self.cache_key(geometry)
        self.group_column, self.held_out_fraction, self.split_seed = (
            group_column,
            held_out_fraction,
            split_seed,
        )
        self.train_reports: list[str] = []
        self.test_reports: list[str] = []
        self.dropped_findings: list[str] = []
        self.unlabelled: list[str] = []
        self.test_ids: list[str] = []  # the held-out studies' ids (the manifest's id column), in loader order
        self.train_ids: list[str] = []  # the probe-train studies' ids, likewise
        self.text_only_reports, self.text_only_batch_size = text_only_reports, text_only_batch_size
        self.text_only_set: list[tuple[str, torch.Tensor]] = []

    # MONAI's random transforms draw from their own generators: seeded per worker from the loader's seed
    worker_init_fn = staticmethod(monai_worker_init_fn)

    @property
    def id_column(self) -> str:
        return next(iter(self.volumes.values()))

    def cache_key(self, geometry: dict) -> str:
        """A cache sub-folder per preprocessing: changing spacing, window or size never reuses stale tensors."""
        values = {
            k: float(v) if isinstance(v, int | float) else list(map(float, v)) for k, v in geometry.items()
        }
        text = json.dumps([type(self).__name__, values])
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def volume_sources(self, row) -> dict[str, str]:
        """The files of one manifest row, as the preprocessing's input dict."""
        return {
            key: str((self.manifest.parent / row[column]).resolve()) for key, column in self.volumes.items()
        }

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain_set is not None:
            return
        table = self._read_manifest()
        sources = [self.volume_sources(row) for _, row in table.iterrows()]
        self.preprocessed = self._preprocessed(sources)
        skipped, keep = [], []
        for row, source in enumerate(tqdm(sources, desc="checking + caching volumes", unit="vol")):
            try:
                self.preprocessed[row]  # preprocessed once (a cache miss) or read back (a hit)
                keep.append(row)
            except Exception as err:
                root = err
                while root.__cause__ is not None:  # MONAI wraps the reason in "applying transform ..."
                    root = root.__cause__
                where = ", ".join(source.values())
                reason = str(root).splitlines()[0]
                for path in source.values():
                    reason = reason.replace(f"{path}: ", "")
                if not self.skip_bad:
                    raise ValueError(
                        f"{where}: {reason} (set data.skip_bad=true to skip and list such volumes)"
                    ) from err
                skipped.append((where, reason))
        if skipped:
            log.warning("skipped %d volumes; the list is in %s", len(skipped), self.write_skip_list(skipped))
        table = table.iloc[keep].reset_index(drop=True)
        reports = (
            table[self.report_column].fillna("").astype(str).tolist()
            if self.report_column in table
            else [""] * len(table)
        )
        names, labels = self._labels(table, reports)
        # split on the manifest's own (relative) entries: the same study lands on the same side wherever the
        # data folder lives
        ids = table[self.id_column].astype(str).tolist()
        group = splits.group_column(self.group_column, table.columns)
        if group:  # by patient (hash of the patient id: multi-label findings, no stratification)
            groups = table[group].astype(str).tolist()
            test, self.split = splits.by_group(groups, None, self.held_out_fraction, self.split_seed, group)
        else:
            test, self.split = splits.by_id(ids, self.held_out_fraction, self.split_seed)
        train = torch.tensor([not t for t in test])
        labelled = ((labels[train] == 0) | (labels[train] == 1)).any(0)
        self.unlabelled = [n for n, ok in zip(names, labelled.tolist()) if not ok]
        self.dropped_findings = self.unlabelled if self.unlabelled_findings == "drop" else []
        if self.unlabelled:
            log.warning("findings with no present/absent label in the training split, %s (data.unlabelled_"
                        "findings=%s): %s", "dropped" if self.dropped_findings else "kept",
                        self.unlabelled_findings, self.unlabelled)  # fmt: skip
        if self.dropped_findings:
            names, labels = [n for n, ok in zip(names, labelled.tolist()) if ok], labels[:, labelled]
        self.tasks = [Task(n, 2) for n in names]
        items = [{"index": row, "labels": labels[i], "report": reports[i]} for i, row in enumerate(keep)]
        self.test_ids = [i for i, t in zip(ids, test) if t]
        self.train_ids = [i for i, t in zip(ids, test) if not t]
        absent = [c for c in self.metadata_columns if c not in table.columns]
        if absent:
            raise ValueError(
                f"{self.manifest}: no column {absent[0]!r} for evaluation.subgroups (columns: {list(table.columns)})"
            )
        self.item_metadata = {i: {c: "" if pd.isna(v) else str(v) for c, v in zip(self.metadata_columns, row)}
                              for i, row in zip(ids, table[self.metadata_columns].itertuples(index=False))}  # fmt: skip
        self.train_groups = [g for g, t in zip(groups, test) if not t] if group else None
        train_items = [it for it, t in zip(items, test) if not t]
        test_items = [it for it, t in zip(items, test) if t]
        self.train_reports = [it["report"] for it in train_items]
        self.test_reports = [it["report"] for it in test_items]
        self.pretrain_set = self._dataset(train_items, train=True, with_report=self.pair_reports)
        self.probe_train_set = self._dataset(train_items, train=False)
        self.probe_test_set = self._dataset(test_items, train=False)
        if self.text_only_reports:
            self.text_only_set = self._text_only_set([t.name for t in self.tasks])

    def _text_only_set(self, names: list[str]) -> list[tuple[str, torch.Tensor]]:
        """(report, labels over ``names``) for each row of ``text_only_reports``."""
        path = Path(self.text_only_reports).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text_only_reports not found: {path}")
        if not self.labeller:
            raise ValueError(f"{path}: text-only reports need data.labeller to label them")
        table = tables.read_csv(path, "text_only_reports")
        if self.report_column not in table.columns:
            raise ValueError(f"{path}: no column {self.report_column!r} (columns: {list(table.columns)})")
        reports = table[self.report_column].tolist()
        found, labels = self._labels(table, reports, "text_only_report_labels.csv")
        labels = labels[:, [found.index(n) for n in names]]
        return list(zip(reports, labels))

    def train_dataloader(self):
        paired = super().train_dataloader()
        if not (self.pair_reports and self.text_only_set):
            return paired
        from lightning.pytorch.utilities import CombinedLoader
        from torch.utils.data import RandomSampler

        draws = RandomSampler(self.text_only_set, replacement=True, num_samples=2**31 - 1)
        text_only = ResumableLoader(self.text_only_set, batch_size=self.text_only_batch_size, sampler=draws)
        return CombinedLoader({"paired": paired, "text_only": text_only}, mode="min_size")

    def _labels(self, table: pd.DataFrame, reports: list[str], cache: str = "report_labels.csv"
                ) -> tuple[list[str], torch.Tensor]:  # fmt: skip
        """(finding names, (N, C) int64: 1, 0, UNCERTAIN -2, MISSING -1) from columns or the labeller
        (its labels kept in the run folder's ``cache`` file)."""
        if self.labeller:
            source = (self.output_dir or Path.cwd()) / cache
            frame = self._distilled_labels(table, reports, source)
        else:
            source = self.manifest
            columns = self.label_columns or [c for c in table.columns if c not in self._non_label_columns()]
            missing = [c for c in columns if c not in table.columns]
            if missing:
                raise ValueError(f"{self.manifest}: label columns {missing} not found")
            frame = table[columns]
        array = tables.finding_labels(frame, source)
        array = np.where(np.isnan(array), MISSING, np.where(array == -1, UNCERTAIN, array))
        return list(frame.columns), torch.from_numpy(array.astype(np.int64))

    def held_out_ids(self) -> list[str]:
        return list(self.test_ids)

    def _non_label_columns(self) -> set:
        return {
            *self.volumes.values(),
            self.report_column,
            self.group_column,
            *splits.GROUP_COLUMNS,
            *self.metadata_columns,
        }

    def _distilled_labels(self, table: pd.DataFrame, reports: list[str], path: Path) -> pd.DataFrame:
        """Labels from the report text (greenlab.labels), cached in the run folder's ``path``: never
        recomputed."""
        vocabulary = self.labeller.vocabulary
        ids = [str(i) for i in range(len(table))]
        if path.is_file():
            frame = pd.read_csv(path, dtype={"report": str}, keep_default_na=False)
            if frame["report"].tolist() != reports or list(frame.columns[2:]) != vocabulary.names:
                raise ValueError(f"{path} was made from other reports or findings; use a new run folder")
            log.info("report labels reused from %s", path)
            return frame[vocabulary.names]
        frame = label_reports(ids, reports, self.labeller)
        frame.insert(1, "report", reports)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        log.info("labels distilled from %d reports (%s) -> %s", len(reports), self.labeller, path)
        return frame[vocabulary.names]

    def describe(self) -> dict:
        return {**super().describe(), "dropped_findings": self.dropped_findings,
                "unlabelled_findings": {"rule": self.unlabelled_findings, "findings": self.unlabelled},
                "labels_from": f"reports ({self.labeller})" if self.labeller else "manifest columns",
                "text_only_reports": len(self.text_only_set), "crop_size": self.crop_size,
                "volume_augmentation": self.volume_augmentation}  # fmt: skip

    def _preprocessed(self, sources: list[dict[str, str]]):
        """The deterministic chain over every manifest row, cached on disk when ``cache_dir`` is set: one file
        per volume, named by its source files' paths, sizes and modification times (``source_stamp``), so
        an edited or replaced volume is re-processed alone; MONAI writes each file atomically and recomputes
        one that does not load. A DICOM series is checked for slice gaps first (on a cache miss only): one flat
        chain, as PersistentDataset caches only up to the first Randomizable, which a nested Compose is."""
        chain = mt.Compose([CheckSeriesGapsd(list(self.volumes)), *self.preprocess.transforms])
        if not self.cache_dir:
            return Dataset(sources, transform=chain)
        return PersistentDataset(sources, transform=chain, cache_dir=self.cache_dir, hash_func=source_stamp)

    def _dataset(self, items: list[dict], train: bool, with_report: bool = False):
        """Training or evaluation samples: the cached volume of each item's row, then the crops chain."""
        keys = ("image", "report", "labels") if with_report else ("image", "labels")
        transform = mt.Compose([
            mt.Lambda(lambda d: {**d, **self.preprocessed[d["index"]]}),
            self.crops[0 if train else 1],
            mt.Lambda(lambda d: tuple(d[k] for k in keys)),
        ])  # fmt: skip
        dataset = Dataset(items, transform=transform)
        set_rnd(dataset, seed=torch.initial_seed() % 2**32)  # the run's seed, for loading in this process
        return dataset

    def _read_manifest(self) -> pd.DataFrame:
        table = tables.read_csv(self.manifest, "manifest")
        needed = [*self.volumes.values(), self.group_column]
        absent = [c for c in needed if c and c not in table.columns]
        if absent:
            raise ValueError(f"{self.manifest}: no column {absent[0]!r} (columns: {list(table.columns)})")
        if self.labeller and self.report_column not in table.columns:
            raise ValueError(f"{self.manifest}: labels from reports need the column {self.report_column!r}")
        return table
