"""Sparse backends, masked-dense vs MinkowskiEngine: SparK training-step time and peak memory on
nn-MobileNet, and the cost of the depthwise convolution MinkowskiEngine 0.5.4 lacks; with ``--dims 3``, SparK
in 3D on GreenRFM's r3d_18 (volumes img x img x img, ``--stem`` its stem kernel).

    python -m benchmarks.sparse_backends [--img 224] [--batch 8] [--steps 5]
    python -m benchmarks.sparse_backends --dims 3 [--img 64] [--batch 4] [--steps 3] [--stem 2]

Each backend runs in its own process (peak memory is per process: peak RSS on CPU,
max_memory_allocated on GPU). Writes benchmarks/results/sparse_backends_<cpu|gpu>.json (3D:
sparse_backends_3d_<cpu|gpu>.json); the 2D run also copies it to this machine's measured choice
(``greenlab.sparse.measured_choice_path``), which ``objective.sparse_backend=auto`` then follows, in 2D and 3D.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import subprocess
import sys
import time

import torch

from greenlab.sparse import measured_choice_path


def spark_network(dims: int, img: int, batch: int, model_name: str, stem: int):
    """(backbone, inputs, the encoder's total stride): nn-MobileNet on images or r3d_18 on volumes."""
    from greenlab.backbones.hierarchy import DOWNSAMPLE
    from greenlab.config import build

    if dims == 2:
        return (
            build("backbone/nn_mobilenet", model_name=model_name),
            torch.randn(batch, 3, img, img),
            DOWNSAMPLE,
        )
    backbone = build("backbone/resnet3d18", stem_kernel=stem, weights="random")
    return backbone, torch.randn(batch, 1, img, img, img), backbone.strides[-1]


def step_benchmark(backend: str, img: int, batch: int, steps: int, model_name: str, dims: int = 2,
                   stem: int = 2) -> dict:  # fmt: skip
    from greenlab.compute.energy import peak_host_memory_bytes
    from greenlab.config import build
    from greenlab.objectives.spark import random_visible_mask

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    backbone, images, stride = spark_network(dims, img, batch, model_name, stem)
    objective = build("objective/spark", backbone=backbone, sparse_backend=backend).to(device).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    images = images.to(device)
    times = []
    for step in range(steps + 1):  # the first step warms up
        visible = random_visible_mask(batch, (img // stride,) * dims, 0.6, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = objective(images, visible)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_host_memory_bytes()
    return {
        "backend": backend,
        "device": device.type,
        "step_seconds_median": statistics.median(times),
        "step_seconds_all": times,
        "images_per_second": batch / statistics.median(times),
        "peak_memory_bytes": peak,
        "peak_memory_method": "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
    }


def depthwise_benchmark(channels: int = 696, size: int = 28, batch: int = 8, repeats: int = 5) -> dict:
    """One 3x3 depthwise conv (a ReXNet-300 stage-3 layer at 224 px), 40 % of positions visible."""
    from greenlab.compat import import_minkowski
    from greenlab.objectives.spark import random_visible_mask
    from greenlab.sparse import masked_dense, minkowski

    ME = import_minkowski()
    torch.manual_seed(0)
    visible = random_visible_mask(batch, (7, 7), 0.6, "cpu")
    x = torch.randn(batch, channels, size, size)
    conv = torch.nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
    ours = minkowski.sparsify(copy.deepcopy(conv))
    masked = masked_dense.sparsify(copy.deepcopy(conv))
    stock = ME.MinkowskiChannelwiseConvolution(channels, kernel_size=3, dimension=2)
    scale = size // 7  # the feature map's cells per mask cell
    full = visible.repeat_interleave(scale, -2).repeat_interleave(scale, -1)[:, 0]
    coords = full.nonzero().int().contiguous()
    sparse_x = ME.SparseTensor(x.permute(0, 2, 3, 1)[full], coordinates=coords)

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            (out.F if hasattr(out, "F") else out).sum().backward()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def run_masked():
        with masked_dense.active_mask(visible):
            return masked(x * full.unsqueeze(1))

    return {
        "layer": f"3x3 depthwise, {channels} channels, {size}x{size}, batch {batch}, 40% visible, fwd+bwd",
        "masked_dense_seconds": timed(run_masked),
        "minkowski_kernel_map_index_add_seconds (ours)": timed(lambda: ours(sparse_x)),
        "minkowski_stock_channelwise_seconds": timed(lambda: stock(sparse_x)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default="rexnet_300")
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--stem", type=int, default=2, help="3D: r3d_18's stem kernel (2: GreenRFM, 4: lite)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(
                step_benchmark(args.one, args.img, args.batch, args.steps, args.model, args.dims, args.stem)
            )
        )
        return
    from benchmarks.common import write

    runs = []
    for backend in ("masked_dense", "minkowski"):
        cmd = [sys.executable, "-m", "benchmarks.sparse_backends", "--one", backend, "--img", str(args.img),
               "--batch", str(args.batch), "--steps", str(args.steps), "--model", args.model, "--dims", str(args.dims),
               "--stem", str(args.stem)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(
            f"{backend}: {runs[-1]['step_seconds_median']:.3f} s/step, {runs[-1]['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    faster = min(runs, key=lambda r: r["step_seconds_median"])["backend"]
    device = "gpu" if torch.cuda.is_available() else "cpu"
    if args.dims == 3:
        payload = {
            "benchmark": "SparK-3D training step (fwd+bwd+AdamW) on r3d_18, mask ratio 0.6",
            "model": f"r3d_18, stem kernel {args.stem}",
            "volume_size": [args.img] * 3,
            "batch": args.batch,
            "runs": runs,
            "faster_backend": faster,
            "speed_ratio_minkowski_over_masked_dense": runs[1]["step_seconds_median"]
            / runs[0]["step_seconds_median"],
        }
        print(write(f"sparse_backends_3d_{device}", payload))
        print(json.dumps({k: v for k, v in payload.items() if k != "runs"}, indent=2))
        return
    depthwise = depthwise_benchmark() if not torch.cuda.is_available() else None
    payload = {
        "benchmark": "SparK training step (fwd+bwd+AdamW) on nn-MobileNet, mask ratio 0.6",
        "model": args.model,
        "img_size": args.img,
        "batch": args.batch,
        "runs": runs,
        "faster_backend": faster,
        "speed_ratio_minkowski_over_masked_dense": runs[1]["step_seconds_median"]
        / runs[0]["step_seconds_median"],
        "depthwise_conv": depthwise,
    }
    path = write(f"sparse_backends_{device}", payload)
    print(path)
    choice = measured_choice_path(device)  # what objective.sparse_backend=auto reads on this machine
    choice.parent.mkdir(parents=True, exist_ok=True)
    if choice.exists():
        print(f"replacing this machine's earlier measurement {choice}")
    shutil.copyfile(path, choice)
    print(f"sparse_backend=auto now picks {faster} here ({choice})")
    print(json.dumps({k: v for k, v in payload.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
