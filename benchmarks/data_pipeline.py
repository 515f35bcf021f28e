"""Is the data loader the bottleneck? Per experiment, at its demo scale on the embedded data:

- loader alone: samples/s of its training DataLoader (its num_workers, decoding and augmentation);
- training through greenlab with that loader, and with one batch repeated (no loading at all).

    python -m benchmarks.data_pipeline [--steps 12] [--only retfound_green ...] [hydra overrides, e.g. data.num_workers=8]
    python -m benchmarks.data_pipeline --paper-photos 1000 --only retfound_green sparse_cnn_mae data.num_workers=16

``--paper-photos N``: at paper scale instead (``scale=paper``: 392 px and batch 128 for retfound_green, 224 px
for SparK) on N generated 1024-px fundus JPEGs (benchmarks.loader_cache's, kept under
$GREENLAB_HOME/bench_photos), read through the preprocessing cache (filled before timing): the question
"can this machine's cores feed the GPU at the paper's sizes?" (goal: ratio >= 0.95).

ratio = training throughput with the real loader / with the repeated batch: 1.0 = loading costs
nothing, below 1 = the loader holds training back. On a 2-core CPU the workers compete with training
for the same cores. Writes benchmarks/results/data_pipeline_<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from benchmarks.common import SameBatch, StepClock, write
from greenlab.config import CONFIG_DIR

EXPERIMENTS = ("retfound_green", "sparse_cnn_mae", "greenrfm")


def paper_scale(photos: int, data_dir: str) -> list[str]:
    """Overrides for the paper-scale comparison on ``photos`` generated 1024-px photographs."""
    from benchmarks.loader_cache import photographs

    home = Path(os.environ.get("GREENLAB_HOME", "~/.cache/greenlab")).expanduser()
    folder = photographs(home / "bench_photos", photos)[0].parent
    return [
        "scale=paper",
        "data=fundus_folder",
        f"data.root={folder}",
        f"data.pixel_cache_dir={data_dir}/bench_cache",
    ]


def measure(experiment: str, steps: int, warmup: int, data_dir: str, extra: list[str]) -> dict:
    overrides = [
        f"+experiment={experiment}",
        "paths.output_dir=/tmp/greenlab_bench",
        f"paths.data_dir={data_dir}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"

    def train(repeat_one_batch: bool) -> float:
        L.seed_everything(0)
        datamodule, objective, clock = instantiate(cfg.data), instantiate(cfg.objective), StepClock()
        if repeat_one_batch:
            datamodule.setup("fit")
            batch = next(iter(datamodule.train_dataloader()))
            datamodule.train_dataloader = lambda: SameBatch(batch, steps)
        trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, max_epochs=cfg.trainer.max_epochs,
                            precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[clock])  # fmt: skip
        trainer.fit(objective, datamodule=datamodule)
        return datamodule.batch_size / clock.seconds_per_step(warmup)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if (
        getattr(datamodule, "cache", None) is not None
    ):  # fill the preprocessing cache before anything is timed
        for path in datamodule._scan():
            datamodule.load(path)
    loader = datamodule.train_dataloader()
    iterator = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch, nothing cached
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    loader_alone = steps * datamodule.batch_size / (time.perf_counter() - start)
    with_loader = train(repeat_one_batch=False)
    repeated = train(repeat_one_batch=True)
    return {
        "experiment": experiment,
        "scale": cfg.scale_name,
        "batch": datamodule.batch_size,
        "num_workers": datamodule.num_workers,
        "loader_alone_samples_per_second": loader_alone,
        "training_samples_per_second_real_loader": with_loader,
        "training_samples_per_second_same_batch": repeated,
        "ratio_real_over_same_batch": with_loader / repeated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(EXPERIMENTS))
    parser.add_argument("--data-dir", default="data")
    parser.add_argument(
        "--paper-photos", type=int, default=0, help="paper scale on this many 1024-px photographs"
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every experiment, e.g. data.num_workers=8"
    )
    args = parser.parse_args()
    results = []
    scale = paper_scale(args.paper_photos, args.data_dir) if args.paper_photos else []
    for experiment in args.only:
        results.append({**measure(experiment, args.steps, args.warmup, args.data_dir, [*scale, *args.overrides]),
                        "overrides": args.overrides})  # fmt: skip
        print(results[-1], flush=True)
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    suffix = ("_paper" if args.paper_photos else "") + "".join(
        f"_{o.split('.')[-1].replace('=', '')}" for o in args.overrides
    )
    print(
        "wrote", write(f"data_pipeline_{kind}{suffix}", {"command": " ".join(sys.argv), "results": results})
    )


if __name__ == "__main__":
    main()
