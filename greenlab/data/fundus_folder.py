"""A folder of fundus photographs (jpg / png / tif / bmp, searched recursively) with optional labels CSV.

Labels CSV: one row per image, an id column (matched against the image's path relative to the folder,
with or without extension, or its file name / stem when that is unique in the folder) and one column per
label task: non-negative integers, or text classes in the order ``label_types`` gives
(greenlab/labels/tables.py); an empty cell = no label for that task.
Optional columns that are not tasks: a group column (patient / subject id; all images of a group land on
one side of the held-out split) and a split column (the dataset's official train / val / test).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from greenlab.data import splits
from greenlab.data.base import ImageDataModule, ItemDataset, Task
from greenlab.data.cache import PreprocessedCache
from greenlab.data.fundus import FIELD_OF_VIEW, crop_field_of_view
from greenlab.data.transforms2d import (
    PRETRAIN_TRANSFORMS,
    eval_transform,
    finetune_transforms,
    official_eval_transform,
)
from greenlab.labels import tables

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# how the probe sets' photographs become tensors (``use_probe_preprocessing``, the evaluation's choice)
PROBE_PREPROCESSING = {
    "greenlab": "the field-of-view crop (fov_crop), padded square, downsampled to max_side; Resize((img_size, "
    "img_size)) of the PIL image; normalised",
    "official": "RETFound-Green's inference notebooks: the raw photograph (no crop), Resize((img_size, img_size), "
    "antialias=True) of its uint8 tensor (aspect ratio squashed); ToDtype(float32, scale=True); normalised",
}
MIN_SIDE = 32  # px: a smaller file is not a fundus photograph (a thumbnail, an icon, a broken export)


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit and 32-bit greyscale (TIFF ``I;16``, ``I``, ``F``) are scaled by their bit depth
    (65,535 -> 255), not clipped at 255 as ``convert("RGB")`` does; float images in [0, 1] by 255."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.size and (pixels.min() < 0 or not np.isfinite(pixels).all()):
            raise ValueError(f"{image.mode} pixels outside [0, 65535] or not finite")
        top = pixels.max(initial=0)
        full = 65535.0  # the integer modes hold 16-bit data
        if image.mode == "F":  # float: its range says its scale
            full = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
        if top > full:
            raise ValueError(f"{image.mode} pixels up to {top:g}, beyond 16 bits")
        grey = np.round(pixels * (255.0 / full)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def check_size(size: tuple[int, int]) -> None:
    """Refuse an image under ``MIN_SIDE`` px a side."""
    if min(size) < MIN_SIDE:
        raise ValueError(f"{size[0]}x{size[1]} px, smaller than {MIN_SIDE} px a side")


class FundusFolderDataModule(ImageDataModule):
    """Args:
    root: folder of photographs. labels_csv: optional CSV (see module doc); id_column: its id column;
    label_columns: task columns (default: every other column but the group and split columns); label_types:
    {column: [class order] | text} for text-valued tasks (``greenlab.labels.tables.class_labels``).
    group_column: patient / subject id column (None: ``splits.GROUP_COLUMNS`` when the CSV has one); the
    held-out split is then by group, stratified by the first task. split_column: the official split column
    (train / val / test) instead. held_out_fraction / split_seed: the deterministic held-out split for
    probe evaluation (by group, else by image id); pre-training uses the other images.
    img_size: network input px; mean/std: normalisation; augmentation: pre-training augmentations,
    ``retfound_green``, ``spark``, ``mae`` or ``none`` (greenlab/data/transforms2d.py); augment_on: where they run,
    ``workers``, ``device`` or ``auto`` (``ImageDataModule``, greenlab/data/device_augment.py). fov_crop: crop the black border first.
    max_side: downsample after cropping (px). pixel_cache_dir: keep each photograph's decoded, cropped, downsampled
    pixels there (``greenlab/data/cache.py``; None: decode every time). verify: decode every image in
    ``setup`` so a bad file fails before training. skip_bad: instead of failing on an unreadable image or a missing label row, skip it
    and list it in ``skipped_inputs.csv`` in the run directory.
    The probe sets' preprocessing (``PROBE_PREPROCESSING``) is the evaluation's choice (``use_probe_preprocessing``,
    ``evaluation.preprocessing``); ``greenlab`` until it says otherwise.
    """

    def __init__(
        self,
        root: str,
        labels_csv: str | None,
        id_column: str,
        label_columns: list[str] | None,
        label_types: dict | None,
        group_column: str | None,
        split_column: str | None,
        held_out_fraction: float,
        split_seed: int,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augmentation: str,
        fov_crop: bool,
        max_side: int,
        pixel_cache_dir: str | None,
        verify: bool,
        skip_bad: bool,
        metadata_columns: list[str],
        augment_on: str,
        **loader_kwargs,
    ):
        super().__init__(augment_on=augment_on, **loader_kwargs)
        self.metadata_columns = list(metadata_columns or [])
        self.root = Path(root).expanduser()
        self.labels_csv = Path(labels_csv).expanduser() if labels_csv else None
        self.id_column, self.label_columns, self.label_types = (
            id_column,
            label_columns,
            dict(label_types or {}),
        )
        self.label_schema: dict[str, dict] = {}
        self.group_column, self.split_column = group_column, split_column
        self.held_out_fraction, self.split_seed = held_out_fraction, split_seed
        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)
        self.augmentation = augmentation
        self.fov_crop, self.max_side, self.verify, self.skip_bad = fov_crop, max_side, verify, skip_bad
        # the crop's parameters: the cache's key and results.json's record of the preprocessing
        self.field_of_view = (
            {**FIELD_OF_VIEW, "pad_to_square": True, "max_side": max_side} if fov_crop else None
        )
        params = {"field_of_view": self.field_of_view, "max_side": max_side}
        self.cache = PreprocessedCache(pixel_cache_dir, params) if pixel_cache_dir else None
        self.skipped: list[tuple[str, str]] = []
        self.probe_preprocessing = "greenlab"
        self.probe_transforms = {
            "greenlab": eval_transform(img_size, self.mean, self.std),
            "official": official_eval_transform(img_size, self.mean, self.std),
        }

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain_set is not None:
            return
        paths = self._scan()
        skipped: list[tuple[str, str]] = []
        if self.verify:
            paths = self._verified(paths, skipped)
        ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in paths]
        labels, meta = torch.full((len(ids), 0), -1), {}
        if self.labels_csv:
            labels, meta = self._read_labels(paths, ids, skipped)
            # drop the images listed for having no label row (skip_bad)
            unlabelled = {path for path, _ in skipped}
            keep = [i for i, p in enumerate(paths) if str(p) not in unlabelled]
            paths, ids, labels = [paths[i] for i in keep], [ids[i] for i in keep], labels[keep]
            meta = {kind: (column, [v[i] for i in keep]) for kind, (column, v) in meta.items()}
        if skipped:
            listed = self.write_skip_list(skipped)
            log.warning(
                "skipped %d of the images under %s; the list is in %s", len(skipped), self.root, listed
            )
        self.skipped = skipped
        train_idx, probe_train_idx, test_idx = self._split(ids, labels, meta)
        train_tf = PRETRAIN_TRANSFORMS[self.augmentation](self.img_size, self.mean, self.std)
        self.use_pretrain_pipeline(train_tf)

        def subset(indices, transform, load):
            chosen = [paths[i] for i in indices]
            return ItemDataset([ids[i] for i in indices], lambda k: load(chosen[k]), labels[indices], transform,
                               load_pixels=lambda k: self.load_pixels(chosen[k]),
                               load_batch=(lambda ks, allocate: self.cache.get_batch([chosen[k] for k in ks], self.preprocess, allocate))
                               if self.cache else None)  # fmt: skip

        self.pretrain_set = subset(train_idx, train_tf, self.load)
        if self.tasks:
            self.probe_train_set = subset(probe_train_idx, self.probe_transform, self.load_probe)
            self.probe_test_set = subset(test_idx, self.probe_transform, self.load_probe)
        if (
            "group" in meta
        ):  # the patient of each probe-train image (label-efficiency subsets keep them whole)
            self.train_groups = [str(meta["group"][1][i]) for i in probe_train_idx]

    def use_probe_preprocessing(self, name: str) -> None:
        """Preprocess the probe sets' photographs the ``greenlab`` or the ``official`` way (``PROBE_PREPROCESSING``),
        from now on (before or after ``setup``)."""
        if name not in PROBE_PREPROCESSING:
            raise ValueError(
                f"probe preprocessing must be one of {sorted(PROBE_PREPROCESSING)}, not {name!r}"
            )
        self.probe_preprocessing = name

    def load_probe(self, path: Path) -> Image.Image:
        """A probe photograph: the raw decoded file (``official``) or ``load`` (``greenlab``)."""
        return self.decode(path) if self.probe_preprocessing == "official" else self.load(path)

    def probe_transform(self, image: Image.Image) -> torch.Tensor:
        return self.probe_transforms[self.probe_preprocessing](image)

    def _split(self, ids: list[str], labels: torch.Tensor, meta: dict) -> tuple[list, list, list]:
        """(pre-training, probe-train, held-out) indices; the method into ``self.split``. Without labels
        every image is for pre-training (the held-out split only serves evaluation)."""
        everything = list(range(len(ids)))
        if not self.tasks:
            self.split = {"method": "none (no labels: every image pre-trains)", "images_train": len(ids)}
            return everything, [], []
        if "split" in meta:
            column, values = meta["split"]
            sides, self.split = splits.official(values, column, str(self.labels_csv))
            scored = "test" if "test" in sides else "val"
            self.split["held_out_side"] = scored
            test = [i for i in everything if sides[i] == scored]
            return (
                [i for i in everything if sides[i] != scored],
                [i for i in everything if sides[i] == "train"],
                test,
            )
        if "group" in meta:
            column, groups = meta["group"]
            flags, self.split = splits.by_group(
                groups, labels[:, 0].tolist(), self.held_out_fraction, self.split_seed, column
            )
        else:
            flags, self.split = splits.by_id(ids, self.held_out_fraction, self.split_seed)
        train = [i for i in everything if not flags[i]]
        return train, train, [i for i in everything if flags[i]]

    @property
    def dataset_name(self) -> str:
        return self.root.name

    def fold_transforms(self, img_size: int | None) -> tuple:
        """k-fold fine-tuning's (training, scoring) transforms: nn-MobileNet's (``transforms2d``)."""
        return finetune_transforms(img_size or self.img_size, self.mean, self.std)

    def describe(self) -> dict:
        return {**super().describe(), "preprocessing": {
            "field_of_view_crop": self.field_of_view,
            "resize": [self.img_size, self.img_size], "interpolation": "bilinear", "crop_pct": 1.0,
            "mean": list(self.mean), "std": list(self.std), "probe_sets": self.probe_preprocessing},
            "label_schema": self.label_schema}  # fmt: skip

    def load(self, path: Path) -> Image.Image:
        """One photograph as RGB, field-of-view cropped and downsampled when configured (from the cache when
        there is one)."""
        return self.cache.get(path, self.preprocess) if self.cache else self.preprocess(path)

    def load_pixels(self, path: Path) -> np.ndarray:
        """``load``'s pixels, (H, W, 3) uint8: the cache entry's as read, without a PIL image in between."""
        if self.cache:
            return self.cache.get_pixels(path, self.preprocess)
        return np.asarray(self.preprocess(path))

    def preprocess(self, path: Path) -> Image.Image:
        """Decode, crop the field of view, pad square, downsample to ``max_side``."""
        image = self.decode(path)
        return crop_field_of_view(image, max_side=self.max_side) if self.fov_crop else image

    def decode(self, path: Path) -> Image.Image:
        """The photograph as 8-bit RGB, as stored (``to_rgb8``); refused under ``MIN_SIDE`` px."""
        try:
            with Image.open(path) as handle:
                image = to_rgb8(handle)
        except Exception as err:
            raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
        try:
            check_size(image.size)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return image

    def _scan(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        return paths

    def _verified(self, paths: list[Path], skipped: list) -> list[Path]:
        good = []
        for path in tqdm(paths, desc=f"checking images in {self.root.name}", unit="img"):
            try:
                with Image.open(path) as handle:
                    handle.load()
                    check_size(handle.size)
                good.append(path)
            except Exception as err:
                reason = f"unreadable image: {type(err).__name__}: {err}"
                if not self.skip_bad:
                    raise ValueError(
                        f"{path}: {reason} (set data.skip_bad=true to skip and list such files)"
                    ) from err
                skipped.append((str(path), reason))
        return good

    def _read_labels(self, paths: list[Path], ids: list[str], skipped: list) -> tuple[torch.Tensor, dict]:
        """(N, T) int64 labels for ``paths`` (-1 = no label), and {"group" / "split": (column, one value per
        image)} for the columns that are given; fills ``self.tasks``."""
        table = tables.read_csv(self.labels_csv, "labels CSV")
        if self.id_column not in table.columns:
            raise ValueError(
                f"{self.labels_csv}: no id column {self.id_column!r} (columns: {list(table.columns)})"
            )
        if table[self.id_column].duplicated().any():
            dup = table[self.id_column][table[self.id_column].duplicated()].tolist()[:5]
            raise ValueError(f"{self.labels_csv}: duplicate ids in {self.id_column!r}: {dup}")
        group_column = splits.group_column(self.group_column, table.columns)
        if group_column and not self.group_column:
            log.info(
                "%s: images grouped by its %r column for the held-out split", self.labels_csv, group_column
            )
        not_tasks = {self.id_column, group_column, self.split_column, *self.metadata_columns} - {None}
        columns = list(self.label_columns or [c for c in table.columns if c not in not_tasks])
        missing_cols = [c for c in [*columns, *not_tasks] if c not in table.columns]
        if missing_cols:
            raise ValueError(
                f"{self.labels_csv}: columns {missing_cols} not found (columns: {list(table.columns)})"
            )
        coded, self.label_schema = tables.class_labels(table, columns, self.labels_csv, self.label_types)
        self.tasks = [Task(c, len(self.label_schema[c]["classes"])) for c in columns]
        row_of = {key: r for r, key in enumerate(table[self.id_column])}
        labels = torch.full((len(paths), len(columns)), -1, dtype=torch.int64)
        meta = {kind: (column, [None] * len(paths))
                for kind, column in (("group", group_column), ("split", self.split_column)) if column}  # fmt: skip
        by_name: dict[str, list[Path]] = {}
        for path in paths:
            for key in {path.name, path.stem}:
                by_name.setdefault(key, []).append(path)
        for i, (path, image_id) in enumerate(zip(paths, ids)):
            key = next((k for k in (image_id, path.name, path.stem) if k in row_of), None)
            if key is not None and key != image_id and len(by_name[key]) > 1:
                first, second = by_name[key][:2]
                raise ValueError(
                    f"{self.labels_csv}: id {key!r} matches both {first} and {second}; use the paths relative to "
                    f"{self.root} as ids (e.g. {first.relative_to(self.root).with_suffix('').as_posix()!r})"
                )
            row = row_of.get(key) if key is not None else None
            if row is None:
                reason = f"no row in {self.labels_csv} for image id {image_id!r}"
                if not self.skip_bad:
                    raise ValueError(
                        f"{path}: {reason} (set data.skip_bad=true to skip and list such images)"
                    )
                skipped.append((str(path), reason))
                continue
            labels[i] = torch.tensor([coded[c][row] for c in columns])
            self.item_metadata[image_id] = {c: _text(table[c].iloc[row]) for c in self.metadata_columns}
            for column, values in meta.values():
                values[i] = table[column].iloc[row]
        return labels, meta


def _text(value) -> str:
    """A metadata cell as text ("" when blank)."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)
