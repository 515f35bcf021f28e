"""The fundus loader at paper scale on one CPU core: source files vs the preprocessing cache.

    python -m benchmarks.loader_cache [--images 1000] [--img 392] [--cache-side 512]

Generates ``--images`` fundus-like 1024-px JPEG photographs (quality 90, as RETFound-Green stores them; made
once under $GREENLAB_HOME/bench_photos), then times one process (= one DataLoader worker) producing training
samples at ``--img`` px with the RETFound-Green augmentations:
- from source: decode the JPEG, crop the field of view, pad square (no resize: already 1024), augment;
- from the cache: the cached pixels (field of view cropped, downsampled to ``--cache-side``), augment;
- the same deterministic part held by MONAI instead: ``CacheDataset`` (arrays in RAM) and
  ``PersistentDataset`` (one torch.save file per photograph), then the same augmentations.
The augmentations end in a uint8 tensor: the float scaling and normalisation happen on the training device,
per batch (``ImageDataModule.on_after_batch_transfer``), not in the workers.
Prints samples/s per worker for both, their ratio, and the cores needed to feed the committed H100 training
rate (872 img/s). Writes benchmarks/results/loader_cache_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import write
from greenlab.config import build

H100_TRAINING_RATE = (
    872.0  # img/s, benchmarks/results/training_steps_gpu_paper.json (Token Reconstruction, 392 px)
)


def photographs(folder: Path, count: int) -> list[Path]:
    """``count`` 1024-px fundus-like JPEGs in ``folder`` (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:1024, :1024]
    disc = ((yy - 512) ** 2 + (xx - 512) ** 2) < 470**2
    paths = []
    for i in range(count):
        path = folder / f"photo{i:04d}.jpg"
        if not path.is_file():
            shade = rng.integers(60, 200, 3)
            noise = rng.integers(0, 40, (1024, 1024, 1))
            pixels = (disc[..., None] * (shade + noise)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def rate(load, items: list, transform) -> float:
    """Samples per second of ``transform(load(item))`` over ``items`` in this process."""
    start = time.perf_counter()
    for item in items:
        transform(load(item))
    return len(items) / (time.perf_counter() - start)


def monai_rates(plain, paths: list[Path], augment, folder: Path) -> dict:
    """samples/s per worker of MONAI's caches of the same deterministic part (``plain.load``), and their fill
    time: CacheDataset (uint8 arrays in RAM) and PersistentDataset (a .pt file per photograph)."""
    from monai.data import CacheDataset, PersistentDataset
    from monai.transforms import Lambda

    deterministic = Lambda(lambda path: np.asarray(plain.load(path)))
    out = {}
    for name, make in (
        ("monai_cache_dataset", lambda: CacheDataset([str(p) for p in paths], deterministic, num_workers=0, progress=False)),
        ("monai_persistent_dataset", lambda: PersistentDataset([str(p) for p in paths], deterministic, cache_dir=folder)),
    ):  # fmt: skip
        start = time.perf_counter()
        dataset = make()
        if name == "monai_persistent_dataset":
            for i in range(len(dataset)):  # the first epoch writes the files
                dataset[i]
        fill = time.perf_counter() - start
        out[name] = {"samples_per_s": rate(dataset.__getitem__, range(len(paths)), lambda a: augment(Image.fromarray(np.asarray(a)))),
                     "fill_seconds": fill}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--img", type=int, default=392)
    parser.add_argument("--cache-side", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as one DataLoader worker
    home = Path(os.environ.get("GREENLAB_HOME", "~/.cache/greenlab")).expanduser()
    paths = photographs(home / "bench_photos", args.images)
    cache = Path(tempfile.mkdtemp(prefix="greenlab_pixel_cache_"))
    try:
        source = build("data/fundus_folder", root=str(paths[0].parent), img_size=args.img, max_side=1024,
                       pixel_cache_dir=None, num_workers=0)  # fmt: skip
        cached = build("data/fundus_folder", root=str(paths[0].parent), img_size=args.img,
                       max_side=args.cache_side, pixel_cache_dir=str(cache), num_workers=0)  # fmt: skip
        from greenlab.data.transforms2d import retfound_green_transform

        augment = retfound_green_transform(args.img, (0.5,) * 3, (0.5,) * 3)
        from_source = rate(source.load, paths, augment)
        fill_start = time.perf_counter()
        for path in paths:
            cached.load(path)
        fill_seconds = time.perf_counter() - fill_start
        from_cache = rate(cached.load, paths, augment)
        entry_bytes = sum(f.stat().st_size for f in cache.rglob("*.px")) / len(paths)
        plain = build("data/fundus_folder", root=str(paths[0].parent), img_size=args.img,
                      max_side=args.cache_side, pixel_cache_dir=None, num_workers=0)  # fmt: skip
        monai = monai_rates(plain, paths, augment, cache / "monai")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result = {
        "benchmark": "loader_cache",
        "images": len(paths),
        "img_size": args.img,
        "cache_side": args.cache_side,
        "samples_per_s_per_worker": {
            "from_source": from_source,
            "from_cache": from_cache,
            **{k: v["samples_per_s"] for k, v in monai.items()},
        },
        "fill_seconds_monai": {k: v["fill_seconds"] for k, v in monai.items()},
        "cache_over_source": from_cache / from_source,
        "cache_fill_seconds": fill_seconds,
        "cache_bytes_per_image": entry_bytes,
        "cores_to_feed_h100_872_img_s": {
            "from_source": math.ceil(H100_TRAINING_RATE / from_source),
            "from_cache": math.ceil(H100_TRAINING_RATE / from_cache),
        },  # fmt: skip
        "goal": "cache >= 4x source per core; <= 4 cores to feed 872 img/s",
    }
    write("loader_cache_cpu", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
