"""``python -m greenlab.embed``: the probe's own embeddings, bit for bit, with an index and a manifest; a killed
run continues without duplicates; a finished folder is refused."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import torch

from greenlab.config import build
from greenlab.evaluation.embeddings import embed
from tests.conftest import TINY_VIT, run_cli

TINY = ["img_size=28", *(f"+backbone.model_kwargs.{k}={v}" for k, v in TINY_VIT.items()), "data.num_images=24",
        "data.eval_batch_size=4", "data.num_workers=0"]  # fmt: skip


def test_embeddings_are_the_probes_own_and_a_killed_run_resumes(tmp_path, data_dir):
    backbone = build("backbone/vit_small_reg4_dinov2", weights="random", img_size=28, model_kwargs=TINY_VIT)
    weights = tmp_path / "tiny_vit.pth"
    torch.save(backbone.state_dict(), weights)
    out = tmp_path / "embeddings"
    command = [*TINY, f"backbone.weights={weights}", f"paths.data_dir={data_dir}", f"out={out}",
               f"hydra.run.dir={tmp_path / 'log'}"]  # fmt: skip
    run_cli(*command, module="greenlab.embed")

    # the linear probe's embeddings of the same weights: its loaders, its embed()
    model = build("backbone/vit_small_reg4_dinov2", weights=str(weights), img_size=28, model_kwargs=TINY_VIT)
    data = build("data/embedded_fundus", img_size=28, num_images=24, eval_batch_size=4, num_workers=0,
                 cache_dir=str(data_dir / "embedded"), pixel_cache_dir=str(data_dir / "fundus_cache"))  # fmt: skip
    data.setup("fit")
    parts = [embed(model, loader, "mean_all", torch.device("cpu")) for loader in data.probe_dataloaders()]
    vectors = np.load(out / "embeddings.npy")
    assert vectors.dtype == np.float32 and np.array_equal(vectors, np.concatenate([p[0] for p in parts]))
    index = list(csv.DictReader((out / "index.csv").open()))
    assert [r["id"] for r in index] == [*data.probe_train_set.ids, *data.held_out_ids()]
    assert [r["split"] for r in index].count("held_out") == len(data.held_out_ids())
    labels = np.concatenate([p[1] for p in parts])
    assert [[int(r[t.name]) for t in data.tasks] for r in index] == labels.tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 24 and manifest["dim"] == 48
    assert manifest["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["init"]["used"] == "file" and manifest["pooling"] == "mean_all"
    assert (
        manifest["preprocessing"]["probe_sets"] == "greenlab" and manifest["throughput"]["images_per_s"] > 0
    )

    # a finished folder is refused
    again = run_cli(*command, module="greenlab.embed", check=False)
    assert again.returncode != 0 and "already holds finished embeddings" in again.stderr

    # killed in the middle of the probe-train set: the shards it saved, no manifest; the same command continues
    killed = tmp_path / "killed"
    (killed / "shards").mkdir(parents=True)
    kept = sorted((out / "shards").glob("probe_train-*.npz"))[:3]
    for shard in kept:
        shutil.copy2(shard, killed / "shards" / shard.name)
    stamps = {p.name: p.stat().st_mtime_ns for p in (killed / "shards").iterdir()}
    resumed = run_cli(
        *command[:-2], f"out={killed}", f"hydra.run.dir={tmp_path / 'log2'}", module="greenlab.embed"
    )
    assert "already embedded" in resumed.stderr + resumed.stdout
    assert all((killed / "shards" / n).stat().st_mtime_ns == t for n, t in stamps.items()), (
        "kept batches kept"
    )
    assert np.array_equal(np.load(killed / "embeddings.npy"), vectors)
    ids = [r["id"] for r in csv.DictReader((killed / "index.csv").open())]
    assert ids == [r["id"] for r in index] and len(set(ids)) == len(ids)
