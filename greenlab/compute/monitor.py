"""Measures what training costs: FLOPs (counted), throughput, device-hours, peak memory, energy, CO2e.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over the first real optimisation step
(forward, backward and optimiser; matmuls and convolutions, as FLOP counters do), divided by that step's
batch size, and multiplied by the images seen. Values are logged as ``compute/*`` and ``energy/*``
every ``log_every_n_steps`` steps and at every epoch end; ``summary()`` gives the totals for results.json
and records the pre-training phase in the run's ``Budget`` (``budget``, given by the pipeline before fit).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from greenlab.compute.budget import JOULES_PER_KWH, Budget
from greenlab.compute.energy import peak_host_memory_bytes
from greenlab.objectives.optim import effective_batch_size
from greenlab.sparse import counting_sparse_flops


class ComputeMonitor(L.Callback):
    """Args: count_flops, log_every_n_steps; ``budget``: the run's ``Budget`` (set before fit)."""

    def __init__(self, count_flops: bool, log_every_n_steps: int):
        self.count_flops, self.log_every_n_steps = count_flops, log_every_n_steps
        self.budget: Budget | None = None
        self.meter = None
        self.flop_counter: FlopCounterMode | None = None
        self.sparse_count = self.sparse_flops = None  # greenlab.sparse's count, open with the flop counter
        self.flops_per_image: float | None = None
        self.images_seen = 0
        self.train_seconds = 0.0
        self.joules = 0.0
        # a resumed run: what the attempts before this one spent (from the checkpoint)
        self.earlier = {"train_seconds": 0.0, "joules": 0.0, "attempts": 0}
        self._started = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.budget is None:
            raise RuntimeError(
                "ComputeMonitor.budget is not set: the pipeline gives it the run's Budget before fit"
            )
        self.meter = self.budget.meter(node_wide=trainer.local_rank == 0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.meter.start()
        self._started = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.count_flops and self.flops_per_image is None and self.flop_counter is None:
            self.flop_counter = FlopCounterMode(display=False)
            self.flop_counter.__enter__()
            self.sparse_count = counting_sparse_flops()
            self.sparse_flops = self.sparse_count.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        batch_size = len((batch["paired"] if isinstance(batch, dict) else batch)[0])
        self.images_seen += batch_size
        if self.flop_counter is not None:
            self.flop_counter.__exit__(None, None, None)
            sparse = self.sparse_flops()
            self.sparse_count.__exit__(None, None, None)
            self.flops_per_image = (self.flop_counter.get_total_flops() + sparse) / batch_size
            self.flop_counter = None
        if trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log_dict(self._running(), on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log_dict(self._running(), on_step=False, on_epoch=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds, self.joules = self._totals()

    def spent(self) -> tuple[float, float]:
        """(train seconds, joules) of this process so far, resumed attempts included; (0, 0) before training
        (read during training, e.g. by ``greenlab.callbacks.probe_monitor``)."""
        return self._totals() if self._started is not None else (0.0, 0.0)

    def _totals(self) -> tuple[float, float]:
        """(train seconds, joules) of this attempt plus the checkpointed ones before it."""
        return (
            self.earlier["train_seconds"] + time.perf_counter() - self._started,
            self.earlier["joules"] + self.meter.read(),
        )

    def state_dict(self) -> dict:
        """Saved in every checkpoint, so a resumed run's budget includes the work before the interruption
        (up to that checkpoint: what ran after it and was lost is not counted)."""
        seconds, joules = self.spent()
        return {"images_seen": self.images_seen, "flops_per_image": self.flops_per_image, "train_seconds": seconds,
                "joules": joules, "attempts": self.earlier["attempts"] + 1}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.images_seen, self.flops_per_image = state["images_seen"], state["flops_per_image"]
        self.earlier = {k: state[k] for k in ("train_seconds", "joules", "attempts")}

    def _running(self) -> dict[str, float]:
        seconds, joules = self._totals()
        kwh = joules / JOULES_PER_KWH
        return {
            "compute/images_seen": float(self.images_seen),
            "compute/train_flops": float((self.flops_per_image or 0.0) * self.images_seen),
            "compute/throughput_img_s": self.images_seen / seconds if seconds > 0 else 0.0,
            "energy/kwh": kwh,
            "energy/co2e_kg": self.budget.co2e_kg(kwh),
        }

    def summary(self, trainer) -> dict:
        """results.json's pre-training ``compute``, reduced over the processes of a distributed run (every
        rank must call it): images and joules summed, wall time and peak memory the maximum of any rank; the
        phase's seconds and joules go to the budget."""
        devices = trainer.num_devices * trainer.num_nodes
        on_gpu = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
        peak = torch.cuda.max_memory_allocated() if on_gpu else peak_host_memory_bytes()
        if trainer.world_size > 1:
            local = torch.tensor([float(self.images_seen), self.joules], dtype=torch.float64,
                                 device=trainer.strategy.root_device)  # fmt: skip
            images, joules = trainer.strategy.reduce(local, reduce_op="sum").tolist()
            most = torch.tensor([self.train_seconds, float(peak)], dtype=torch.float64,
                                device=trainer.strategy.root_device)  # fmt: skip
            seconds, peak = trainer.strategy.all_gather(most).reshape(-1, 2).max(0).values.tolist()
            self.images_seen, self.joules, self.train_seconds = int(images), joules, seconds
        self.budget.add(
            "pretrain", self.train_seconds, self.joules, self.meter.method if self.meter else "not measured"
        )
        return {
            "train_flops": (self.flops_per_image or 0.0) * self.images_seen,
            "train_flops_per_image": self.flops_per_image,
            "flops_method": "torch FlopCounterMode over the first optimisation step (fwd+bwd), plus the sparse kernels' "
            "own count (MinkowskiEngine), x images seen",
            "train_images_seen": self.images_seen,
            "optimizer_steps": trainer.global_step,
            "resumed_attempts": self.earlier["attempts"],
            "train_seconds": self.train_seconds,
            "train_throughput_img_s": self.images_seen / self.train_seconds if self.train_seconds else None,
            "device_hours": self.train_seconds * devices / 3600.0,
            "devices": devices,
            "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
            "precision": str(trainer.precision),
            "peak_memory_bytes": int(peak),
            "world_size": trainer.world_size,
            "effective_batch_size": effective_batch_size(trainer),
            "peak_memory_method": "torch.cuda.max_memory_allocated"
            if on_gpu
            else "peak RSS of the process (getrusage)",
        }
