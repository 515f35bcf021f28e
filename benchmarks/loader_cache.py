"""The fundus loader at paper scale on one CPU core: source files vs the preprocessing cache, and the
augmentations in the workers vs on the training device (``data.augment_on``).

    python -m benchmarks.loader_cache [--images 1000] [--img 392] [--cache-side 512] [--batch 128] [--device-images 256]

Generates ``--images`` fundus-like 1024-px JPEG photographs (quality 90, as RETFound-Green stores them; made
once under $GREENLAB_HOME/bench_photos), then times one process (= one DataLoader worker) producing training
samples at ``--img`` px with the RETFound-Green augmentations:
- from source: decode the JPEG, crop the field of view, pad square (no resize: already 1024), augment;
- from the cache: the cached pixels (field of view cropped, downsampled to ``--cache-side``), augment;
- the same deterministic part held by MONAI instead: ``CacheDataset`` (arrays in RAM) and
  ``PersistentDataset`` (one torch.save file per photograph), then the same augmentations.
The augmentations end in a uint8 tensor: the float scaling and normalisation happen on the training device,
per batch (``ImageDataModule.on_after_batch_transfer``), not in the workers.
Then ``augment_on``, from the cache, batches of ``--batch``: CPU seconds per sample (``time.process_time``, one
thread) of the worker's share (workers: read + augment + collate; device: read the cached pixels + collate
them into a padded uint8 batch, no resampling) and, for ``device``, of the training process's share
(``device_augment.augment`` on this CPU over ``--device-images``; on a GPU, its CUDA time too); then what a real
DataLoader with one worker delivers (the batch through shared memory included), and from that the cores needed
to feed 872 img/s (Token Reconstruction measured on an H100) and 5,300 img/s (its FLOP limit there).
Prints samples/s per worker for both, their ratio, and the cores needed to feed the committed H100 training
rate (872 img/s). Writes benchmarks/results/loader_cache_<cpu|gpu>.json.
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
H100_FLOP_LIMIT_RATE = 5300.0  # img/s: 1.88e11 FLOPs per image at 989 TFLOP/s (bf16 dense), the model's limit


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


def cpu_seconds(work) -> float:
    """CPU seconds (this process, every thread) that ``work()`` takes."""
    start = time.process_time()
    work()
    return time.process_time() - start


def augment_on_shares(cached, paths: list[Path], pipeline, batch: int, device_images: int) -> dict:
    """CPU seconds per sample of the worker's share with the augmentations in the workers and on the device,
    and of the training process's share on the device (this CPU; and CUDA ms when a GPU is there)."""
    from torch.utils.data import default_collate

    from greenlab.data import device_augment

    def workers_share():
        for start in range(0, len(paths), batch):
            default_collate(
                [(pipeline(cached.load(p)), torch.zeros(1)) for p in paths[start : start + batch]]
            )

    batches = []

    cached.setup()
    dataset = cached.pretrain_set  # every photograph (no labels: nothing held out)

    def device_worker_share():  # the batched fetch a DataLoader worker makes (ItemDataset.__getitems__)
        dataset.pixels_only = True
        for start in range(0, len(dataset), batch):
            made = dataset.__getitems__(list(range(start, min(start + batch, len(dataset)))))
            if sum(len(b.pixels) for b in batches) < device_images:  # kept for the training process's share
                batches.append(made)
        dataset.pixels_only = False

    workers_share(), device_worker_share()  # warm: the steady state of a long-running worker
    batches.clear()
    workers_s = cpu_seconds(workers_share) / len(paths)
    device_worker_s = cpu_seconds(device_worker_share) / len(paths)
    pixels = torch.cat([b.pixels for b in batches])[:device_images]
    sizes = torch.cat([b.sizes for b in batches])[:device_images]
    shapes = sizes.tolist()

    def draw_all() -> list:  # the training process draws each image's parameters (CPU, torch's generator)
        return [device_augment.draw(pipeline, h, w) for h, w in shapes]

    draw_s = cpu_seconds(draw_all) / len(shapes)
    draws = draw_all()

    def on_this_cpu():
        for start in range(0, len(draws), batch):
            device_augment.augment(pixels[start : start + batch], draws[start : start + batch])

    out = {
        "workers": {"worker_cpu_s_per_sample": workers_s, "samples_per_s_per_core": 1 / workers_s},
        "device": {"worker_cpu_s_per_sample": device_worker_s, "samples_per_s_per_core": 1 / device_worker_s,
                   "training_process_draw_cpu_s_per_sample": draw_s,
                   "training_process_augment_cpu_s_per_sample_on_this_cpu": cpu_seconds(on_this_cpu) / len(draws)},
    }  # fmt: skip
    if torch.cuda.is_available():
        gpu_pixels = pixels.cuda()
        device_augment.augment(gpu_pixels[:batch], draws[:batch])  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, len(draws), batch):
            device_augment.augment(gpu_pixels[first : first + batch], draws[first : first + batch])
        torch.cuda.synchronize()
        out["device"]["gpu_ms_per_sample"] = 1000 * (time.perf_counter() - start) / len(draws)
    for mode in ("workers", "device"):
        out[mode]["one_worker_loader_samples_per_s"] = one_worker_loader_rate(cached, mode == "device", batch)
    for rate, name in ((H100_TRAINING_RATE, "872"), (H100_FLOP_LIMIT_RATE, "5300")):  # one worker per core
        out[f"cores_to_feed_{name}_img_s"] = {
            mode: math.ceil(rate / out[mode]["one_worker_loader_samples_per_s"])
            for mode in ("workers", "device")
        }
    return out


def one_worker_loader_rate(cached, on_device: bool, batch: int) -> float:
    """Samples/s a real DataLoader with one worker delivers to the training process (the batch through shared
    memory included), after its first batch; the training process only receives."""
    from torch.utils.data import DataLoader

    from greenlab.data.base import collate_pixels

    cached.setup()
    dataset = cached.pretrain_set
    dataset.pixels_only = on_device
    loader = DataLoader(
        dataset, batch, shuffle=False, num_workers=1, collate_fn=collate_pixels if on_device else None
    )
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for images, *_ in iterator:
        count += len(images)
    dataset.pixels_only = False
    return count / (time.perf_counter() - start)


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
    parser.add_argument(
        "--batch", type=int, default=128, help="batch of the augment_on comparison (paper: 128)"
    )
    parser.add_argument("--device-images", type=int, default=256,
                        help="images the training process's share on this CPU is timed over")  # fmt: skip
    parser.add_argument("--only-augment-on", action="store_true",
                        help="only the augment_on comparison (skips source files and MONAI)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as one DataLoader worker
    home = Path(os.environ.get("GREENLAB_HOME", "~/.cache/greenlab")).expanduser()
    paths = photographs(home / "bench_photos", args.images)
    cache = Path(tempfile.mkdtemp(prefix="greenlab_pixel_cache_"))
    result = {
        "benchmark": "loader_cache",
        "images": len(paths),
        "img_size": args.img,
        "cache_side": args.cache_side,
    }
    try:
        cached = build("data/fundus_folder", root=str(paths[0].parent), img_size=args.img,
                       max_side=args.cache_side, pixel_cache_dir=str(cache), num_workers=0)  # fmt: skip
        from greenlab.data.transforms2d import retfound_green_transform

        augment = retfound_green_transform(args.img, (0.5,) * 3, (0.5,) * 3)
        fill_start = time.perf_counter()
        for path in paths:
            cached.load(path)
        fill_seconds = time.perf_counter() - fill_start
        result["augment_on"] = {"batch": args.batch, "device_images": args.device_images,
                                **augment_on_shares(cached, paths, augment, args.batch, args.device_images)}  # fmt: skip
        if not args.only_augment_on:
            result.update(source_vs_cache(paths, cached, augment, args, cache, fill_seconds))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result["goal"] = "one core feeds 872 img/s (augment_on=device); cache >= 4x source per core"
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    write(f"loader_cache_{kind}" + ("_augment_on" if args.only_augment_on else ""), result)
    print(json.dumps(result, indent=2))


def source_vs_cache(paths: list[Path], cached, augment, args, cache: Path, fill_seconds: float) -> dict:
    """Samples/s per worker from the source files vs from the cache vs MONAI's caches (augmentations in the
    worker), and the cores to feed 872 img/s."""
    source = build("data/fundus_folder", root=str(paths[0].parent), img_size=args.img, max_side=1024,
                   pixel_cache_dir=None, num_workers=0)  # fmt: skip
    from_source = rate(source.load, paths, augment)
    from_cache = rate(cached.load, paths, augment)
    entry_bytes = sum(f.stat().st_size for f in cache.rglob("*.px")) / len(paths)
    plain = build("data/fundus_folder", root=str(paths[0].parent), img_size=args.img,
                  max_side=args.cache_side, pixel_cache_dir=None, num_workers=0)  # fmt: skip
    monai = monai_rates(plain, paths, augment, cache / "monai")
    return {
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
        },
    }


if __name__ == "__main__":
    main()
