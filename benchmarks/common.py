"""Machine description and JSON output shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def results_folder() -> Path:
    """Where the benchmarks write their JSON: ``RESULTS``, or $GREENLAB_BENCH_RESULTS (the GPU check's
    ``--dry-run`` keeps the committed results as they are)."""
    return Path(os.environ.get("GREENLAB_BENCH_RESULTS", RESULTS))


def machine() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write(name: str, payload: dict) -> Path:
    folder = results_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


class SameBatch:
    """A loader that yields one device-resident batch ``steps`` times (no data loading in the timing)."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


class StepClock(L.Callback):
    """Wall-clock stamps at the end of every training batch (synchronised on CUDA)."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        """Mean step time after ``warmup`` steps."""
        return (self.stamps[-1] - self.stamps[warmup]) / (len(self.stamps) - 1 - warmup)
