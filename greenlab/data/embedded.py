"""The embedded default dataset: procedurally generated, fundus-like colour photographs with lesion labels.

Nothing is downloaded and no real patient data ships with greenlab. ``generate`` draws each image from a
fixed seed: a circular field of view on a black, non-square canvas; an orange-red background with
vignetting; an optic disc, a darker macula, a tree of vessels from the disc; then lesions:

- ``grade`` (0/1/2, ordinal; the first column, so the default fine-tuning task): how many of the two
  lesion types below are present;
- ``haemorrhages`` (0/1): dark red blots;
- ``hard_exudates`` (0/1): small bright yellow spots.

These are synthetic stand-ins that exercise every step of the pipeline (FOV crop, augmentations,
pre-training, probes) on a fresh offline machine; numbers measured on them say nothing about real eyes.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from greenlab.data.fundus_folder import FundusFolderDataModule

GENERATOR_VERSION = 3


def generate(root: Path, num_images: int = 320, width: int = 288, height: int = 256, seed: int = 0) -> Path:
    """Write ``num_images`` PNGs and ``labels.csv`` under ``root/<version+params>/``; reuse it when complete.

    Returns the dataset folder. Deterministic: same arguments, same pixels.
    """
    params = {
        "version": GENERATOR_VERSION,
        "num_images": num_images,
        "width": width,
        "height": height,
        "seed": seed,
    }
    folder = (
        Path(root).expanduser()
        / f"embedded_fundus_v{GENERATOR_VERSION}_n{num_images}_{width}x{height}_s{seed}"
    )
    manifest = folder / "MANIFEST.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_images):
        haemorrhages, exudates = int(rng.random() < 0.5), int(rng.random() < 0.5)
        image = _draw_fundus(rng, width, height, haemorrhages, exudates)
        name = f"fundus_{index:04d}"
        image.save(folder / "images" / f"{name}.png")
        rows.append((name, haemorrhages + exudates, haemorrhages, exudates))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "grade", "haemorrhages", "hard_exudates"])
        writer.writerows(rows)
    manifest.write_text(json.dumps(params))  # written last: marks the folder complete
    return folder


def _draw_fundus(
    rng: np.random.Generator, width: int, height: int, haemorrhages: int, exudates: int
) -> Image.Image:
    radius = 0.46 * min(width, height) * rng.uniform(0.95, 1.0)
    cx, cy = width / 2 + rng.uniform(-4, 4), height / 2 + rng.uniform(-4, 4)
    yy, xx = np.mgrid[0:height, 0:width]
    dist = np.hypot(xx - cx, yy - cy) / radius
    base = np.array([rng.uniform(170, 225), rng.uniform(60, 100), rng.uniform(25, 50)])
    shade = np.clip(1.0 - 0.35 * dist**2, 0, 1)[..., None]
    pixels = base * shade * rng.uniform(0.85, 1.1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    side = rng.choice([-1, 1])  # left or right eye
    disc = (cx + side * 0.42 * radius, cy + rng.uniform(-0.05, 0.05) * radius)
    macula = (cx - side * 0.12 * radius, cy)
    _blob(draw, macula, 0.16 * radius, (int(base[0] * 0.55), int(base[1] * 0.45), int(base[2] * 0.5)))
    for _ in range(rng.integers(5, 8)):  # vessel tree: wavy arcs leaving the disc
        _vessel(draw, rng, disc, radius, side)
    _blob(draw, disc, 0.11 * radius, (250, 215, 150))
    if haemorrhages:
        for _ in range(rng.integers(8, 16)):
            centre = _inside(rng, cx, cy, 0.75 * radius)
            _blob(draw, centre, rng.uniform(0.04, 0.08) * radius, (90, 15, 10))
    if exudates:
        for _ in range(rng.integers(12, 30)):
            centre = _inside(rng, cx, cy, 0.6 * radius)
            _blob(draw, centre, rng.uniform(0.02, 0.04) * radius, (245, 235, 120))

    image = image.filter(ImageFilter.GaussianBlur(0.8))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 3.0, (height, width, 3))
    pixels[dist > 1.0] = 0  # black outside the field of view
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _blob(draw: ImageDraw.ImageDraw, centre, r: float, colour) -> None:
    x, y = centre
    draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in colour))


def _inside(rng: np.random.Generator, cx: float, cy: float, r: float) -> tuple[float, float]:
    angle, dist = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.uniform())
    return cx + dist * math.cos(angle), cy + dist * math.sin(angle)


def _vessel(draw: ImageDraw.ImageDraw, rng: np.random.Generator, start, radius: float, side: int) -> None:
    angle = rng.uniform(-2.0, 2.0) + (math.pi if side > 0 else 0.0)
    points, (x, y) = [start], start
    width = rng.uniform(1.5, 3.5)
    for _ in range(24):
        angle += rng.normal(0, 0.12)
        x, y = x + 0.045 * radius * math.cos(angle), y + 0.045 * radius * math.sin(angle)
        points.append((x, y))
    draw.line(points, fill=(120, 25, 20), width=max(1, round(width)))


class EmbeddedFundusDataModule(FundusFolderDataModule):
    """``FundusFolderDataModule`` over the generated set (made on first use under ``cache_dir``)."""

    def __init__(
        self,
        cache_dir: str,
        num_images: int,
        width: int = 288,
        height: int = 256,
        seed: int = 0,
        **kwargs,
    ):
        self.generator_args = {"num_images": num_images, "width": width, "height": height, "seed": seed}
        self.cache_dir = Path(cache_dir)
        # the generated folder's layout and handling: labels.csv by image_id, a field of view to crop, no bad file
        super().__init__(root=str(self.cache_dir), labels_csv=None, id_column="image_id", label_columns=None, label_types=None,
                         group_column=None, split_column=None, fov_crop=True, verify=True, skip_bad=False, **kwargs)  # fmt: skip

    def prepare_data(self) -> None:
        generate(self.cache_dir, **self.generator_args)

    def setup(self, stage: str | None = None) -> None:
        folder = generate(self.cache_dir, **self.generator_args)
        self.root, self.labels_csv = folder / "images", folder / "labels.csv"
        super().setup(stage)

    @property
    def dataset_name(self) -> str:
        return "embedded_fundus"
