"""Embeddings out: a frozen backbone's embedding of every image of a dataset, to fit your own probe.

    python -m greenlab.embed backbone=retfound_dinov2 backbone.weights=FILE data=fundus_folder data.root=DIR out=DIR

Any backbone group and any data greenlab reads, 2D and 3D (``greenlab/conf/embed.yaml``). ``out`` (a new folder, or
an unfinished one to resume) receives:

- ``embeddings.npy``: (N, E) float32, the rows of the probe-train set, then of the held-out set (``sets``);
- ``index.csv`` (and ``index.parquet`` when pyarrow is installed): row, id, split, one column per label task
  (-1 = no label);
- ``manifest.json``: the weights file and its SHA-256, the backbone's initialisation record, the preprocessing
  actually applied (the data config as resolved, with what the data reports of itself: input size,
  normalisation, field-of-view crop; spacing, orientation, HU window and crop for volumes), the pooling,
  greenlab's version, the throughput, and ``complete``.

The vectors are those the linear probe computes (the same loaders, batches and ``embeddings.embed``), bit for
bit. Each batch is saved as it is computed (``shards/``); a killed run started again with the same command
continues after the last saved batch, and a finished folder is refused, never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

import greenlab
from greenlab.config import CONFIG_DIR
from greenlab.evaluation.embeddings import embed

log = logging.getLogger(__name__)
SETS = ("probe_train", "held_out")
MANIFEST, EMBEDDINGS, INDEX, SHARDS = "manifest.json", "embeddings.npy", "index.csv", "shards"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(requested, init: dict) -> Path | None:
    """The weights file the backbone was read from, when there is one on disk."""
    for candidate in (requested, init.get("source")):
        if isinstance(candidate, str) and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser().resolve()
    return None


def set_ids(datamodule, name: str) -> list[str]:
    """The ids of a set's items, in its loader's order."""
    if name == "held_out":
        return [str(i) for i in datamodule.held_out_ids()]
    dataset = datamodule.probe_train_set
    ids = getattr(dataset, "ids", None) or getattr(datamodule, "train_ids", None)
    return [str(i) for i in (ids if ids is not None else range(len(dataset)))]


def shard(folder: Path, name: str, batch: int) -> Path:
    return folder / SHARDS / f"{name}-{batch:06d}.npz"


def embed_set(
    backbone, loader: DataLoader, folder: Path, name: str, pooling: str, device, bf16: bool
) -> float:
    """Embed one set batch by batch into ``folder/shards/<name>-<batch>.npz`` (vectors, labels), skipping the
    batches already there (a resumed run: the rest of the set in the same batches); returns the seconds spent
    in the backbone."""
    (folder / SHARDS).mkdir(exist_ok=True)
    done = 0
    while shard(folder, name, done).is_file():
        done += 1
    size, total = loader.batch_size, len(loader.dataset)
    if done:
        log.info("%s: %d of %d batches already embedded (%s); continuing", name, done, len(loader), folder)
    if done * size >= total:
        return 0.0
    rest = DataLoader(Subset(loader.dataset, range(min(done * size, total), total)), size, shuffle=False,
                      num_workers=loader.num_workers)  # fmt: skip

    def save(i: int, vectors: np.ndarray, labels: np.ndarray) -> None:
        partial = shard(folder, name, done + i).with_suffix(".tmp.npz")
        np.savez(partial, vectors=vectors.astype(np.float32), labels=labels)
        partial.replace(shard(folder, name, done + i))  # atomic: a killed run leaves whole batches only

    return embed(backbone, rest, pooling, device, bf16, f"embedding {name}", on_batch=save)[2]


def write_outputs(folder: Path, datamodule, sets: list[str]) -> tuple[int, int]:
    """Assemble embeddings.npy and index.csv (index.parquet with pyarrow) from the shards; (rows, dim)."""
    vectors, rows = [], []
    names = [t.name for t in datamodule.tasks]
    for name in sets:
        parts = [np.load(s) for s in sorted((folder / SHARDS).glob(f"{name}-[0-9]*.npz"))]
        ids = set_ids(datamodule, name)
        part = np.concatenate([p["vectors"] for p in parts])
        labels = np.concatenate([p["labels"] for p in parts]).reshape(len(part), -1)
        if len(part) != len(ids):
            raise RuntimeError(f"{folder / SHARDS}: {len(part)} embeddings for {len(ids)} {name} items")
        for case, task_labels in zip(ids, labels):
            rows.append({"row": len(rows), "id": case, "split": name,
                         **{n: int(v) for n, v in zip(names, task_labels)}})  # fmt: skip
        vectors.append(part)
    matrix = np.concatenate(vectors).astype(np.float32)
    np.save(folder / EMBEDDINGS, matrix)
    with (folder / INDEX).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["row", "id", "split", *names])
        writer.writeheader()
        writer.writerows(rows)
    try:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(folder / "index.parquet")
    except ImportError:  # pyarrow (or fastparquet) absent: the CSV alone
        pass
    return matrix.shape


def run_embed(cfg: DictConfig) -> Path:
    """Embed the configured data with the configured backbone into ``cfg.out``; returns the folder."""
    from greenlab.pipeline.run import device_for, follow_backbone

    folder = Path(cfg.out).expanduser()
    manifest_path = folder / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("complete"):
        raise FileExistsError(
            f"{folder} already holds finished embeddings ({MANIFEST}); choose a new out folder"
        )
    unknown = [s for s in cfg.sets if s not in SETS]
    if unknown:
        raise ValueError(f"sets: {unknown[0]!r} is not one of {SETS}")
    folder.mkdir(parents=True, exist_ok=True)
    followed = follow_backbone(cfg)
    torch.manual_seed(cfg.seed)
    backbone, datamodule = instantiate(cfg.backbone), instantiate(cfg.data)
    if hasattr(datamodule, "use_probe_preprocessing"):
        datamodule.use_probe_preprocessing(cfg.preprocessing)
    datamodule.setup("fit")
    device = device_for(cfg.device)
    bf16 = bool(cfg.bf16) and device.type == "cuda"  # as the probes: bf16 autocast on a GPU only
    loaders = dict(zip(SETS, datamodule.probe_dataloaders()))
    started, seconds = time.perf_counter(), 0.0
    for name in cfg.sets:
        seconds += embed_set(backbone, loaders[name], folder, name, cfg.pooling, device, bf16)
    rows, dim = write_outputs(folder, datamodule, list(cfg.sets))
    weights = weights_file(cfg.backbone.get("weights"), backbone.init_record)
    manifest = {
        "complete": True,
        "greenlab_version": greenlab.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": int(rows),
        "dim": int(dim),
        "dtype": "float32",
        "sets": list(cfg.sets),
        "pooling": cfg.pooling,
        "weights": {
            "requested": cfg.backbone.get("weights"),
            "file": str(weights) if weights else None,
            "sha256": sha256(weights) if weights else None,
        },  # fmt: skip
        "init": backbone.init_record,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "preprocessing": {
            "probe_sets": cfg.preprocessing
            if hasattr(datamodule, "use_probe_preprocessing")
            else "the data's own",
            "followed_from_backbone": followed,
            "data": datamodule.describe(),
            "data_config": OmegaConf.to_container(cfg.data, resolve=True),
        },
        "throughput": {
            "images_per_s": rows / seconds if seconds else None,
            "seconds_in_backbone": seconds,
            "wall_seconds": time.perf_counter() - started,
            "device": str(device),
            "method": "backbone forward only (no data loading), this run's batches",
        },  # fmt: skip
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    print(f"greenlab.embed: {rows} x {dim} embeddings -> {folder / EMBEDDINGS} (index: {folder / INDEX})")
    return folder


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="embed")
def main(cfg: DictConfig) -> None:
    run_embed(cfg)
