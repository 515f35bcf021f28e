"""Energy backends side by side: greenlab's meter and codecarbon's tracker read over the same stretch of work
(a training-like loop of matrix products on every CPU core, and on the GPU when there is one).

    python -m benchmarks.energy_backends [--seconds 20]

Writes benchmarks/results/energy_backends_<cpu|gpu>.json: each backend's joules and what it reads (method).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import write
from greenlab.compute.energy import energy_meter


def work(seconds: float, device: torch.device) -> int:
    """Matrix products for ``seconds``; the number of products."""
    a = torch.randn(1024, 1024, device=device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a = torch.tanh(a @ a)
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meters = {name: energy_meter(name, cpu_watts_per_core=10.0) for name in ("greenlab", "codecarbon")}
    for meter in meters.values():
        meter.start()
    start = time.perf_counter()
    products = work(args.seconds, device)
    seconds = time.perf_counter() - start
    joules = {name: meter.read() for name, meter in meters.items()}
    result = {
        "benchmark": "energy_backends",
        "workload": f"{products} products of 1024x1024 matrices on {device.type} over {seconds:.1f} s",
        "backends": {
            name: {"joules": joules[name], "mean_watts": joules[name] / seconds, "reads": meters[name].method}
            for name in meters
        },  # fmt: skip
        "codecarbon_parts_joules": {
            part: getattr(meters["codecarbon"]._tracker, f"_total_{part}_energy").kWh * 3.6e6
            for part in ("cpu", "ram", "gpu")
        },  # fmt: skip
        "ratio_codecarbon_to_greenlab": joules["codecarbon"] / joules["greenlab"]
        if joules["greenlab"]
        else None,
    }
    write(f"energy_backends_{'gpu' if device.type == 'cuda' else 'cpu'}", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
