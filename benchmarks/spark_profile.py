"""Where does SparK's step time go with the real loader vs one repeated batch? (issue: 41 vs 284 samples/s on
an H100 with the real loader, while the loader alone gives 264-840 samples/s; on the 2-core CPU the ratio is
0.82, so the gap is GPU-specific.)

    python -m benchmarks.spark_profile [--steps 20] [overrides, e.g. data.num_workers=8]

Runs the sparse_cnn_mae objective (paper-scale model at the demo data, bf16 on GPU) in a plain loop, twice:
batches from its DataLoader, and one device-resident batch repeated. For each: seconds per step (host wall
time, synchronised), and a torch.profiler table of the top operators by self CPU time and by CUDA time, plus
the count of device synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize / item) and of cuDNN
algorithm searches. Writes benchmarks/results/spark_profile_<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import itertools
import time
from contextlib import nullcontext

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.utilities import move_data_to_device
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import write
from greenlab.config import CONFIG_DIR
from greenlab.objectives.spark import random_visible_mask

SYNC_OPS = (  # each a host-device synchronisation on CUDA (nonzero: boolean-mask indexing)
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense", "aten::nonzero",
)  # fmt: skip


def run(objective, batches, steps: int, device: torch.device, datamodule) -> dict:
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    seconds = []
    with profile(activities=activities) as prof:
        for batch in itertools.islice(batches, steps):
            # timed from the batch's transfer and on-device work (normalisation, augment_on=device)
            start = time.perf_counter()
            images = datamodule.on_after_batch_transfer(move_data_to_device(batch, device), 0)[0]
            grid = (images.shape[-2] // objective.downsample, images.shape[-1] // objective.downsample)
            visible = random_visible_mask(images.shape[0], grid, objective.hparams.mask_ratio, device)
            with autocast:
                loss, _ = objective(images, visible)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    table = prof.key_averages()
    top = lambda key: [  # noqa: E731
        {"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
         "device_ms": getattr(e, "self_device_time_total", 0) / 1e3}
        for e in sorted(table, key=lambda e: getattr(e, key, 0), reverse=True)[:15]
    ]  # fmt: skip
    counts = {e.key: e.count for e in table}
    later = seconds[2:] or seconds
    return {
        "seconds_per_step_median": sorted(later)[len(later) // 2],
        "seconds_per_step": seconds,
        "top_by_self_cpu": top("self_cpu_time_total"),
        "top_by_device": top("self_device_time_total") if device.type == "cuda" else [],
        "synchronisations": {op: counts.get(op, 0) for op in SYNC_OPS},
        "cudnn_searches": sum(c for k, c in counts.items() if "cudnn" in k.lower() and "find" in k.lower()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data-dir", default="/tmp/gldata")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=sparse_cnn_mae", "paths.output_dir=/tmp/greenlab_bench",
                                           f"paths.data_dir={args.data_dir}", *args.overrides])  # fmt: skip
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    real = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
    results = {}
    for name, batches in (("real_loader", real), ("same_batch", None)):
        torch.manual_seed(0)
        objective = instantiate(cfg.objective).to(device).train()
        if batches is None:
            batches = itertools.repeat(move_data_to_device(next(iter(loader)), device))
        results[name] = run(objective, batches, args.steps, device, datamodule)
        print(name, results[name]["seconds_per_step_median"], results[name]["synchronisations"], flush=True)
    ratio = (
        results["same_batch"]["seconds_per_step_median"] / results["real_loader"]["seconds_per_step_median"]
    )
    kind = "gpu" if device.type == "cuda" else "cpu"
    print("wrote", write(f"spark_profile_{kind}", {"overrides": args.overrides, "steps": args.steps,
                                                   "ratio_real_over_same_batch": ratio, **results}))  # fmt: skip


if __name__ == "__main__":
    main()
