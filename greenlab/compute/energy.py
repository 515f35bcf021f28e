"""Energy used by a stretch of work, from the best source the machine offers, with the method named.

- GPUs: NVML's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ) of each GPU this
  process uses: measured.
- CPU: Intel/AMD RAPL package counters (``/sys/class/powercap/intel-rapl:N/energy_uj``) when readable:
  measured, whole package (other processes included). Otherwise an ESTIMATE: CPU-seconds of this process
  and its finished children x ``cpu_watts_per_core``.

kWh -> CO2e: kWh x PUE x grid carbon intensity (kg CO2e / kWh), both configurable.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RAPL_ROOT = Path("/sys/class/powercap")


def process_cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (s)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_host_memory_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class EnergyMeter:
    """``start()``, then ``read()`` (J so far) any number of times; ``method`` says how it was measured.

    Each process measures its own GPU and its own CPU time; RAPL counts a whole node, so with several
    processes per node only one of them (``node_wide=True``, local rank 0) reads it: summed over the
    processes of a DDP run, every GPU and every CPU package is counted once.
    """

    def __init__(self, cpu_watts_per_core: float = 10.0, node_wide: bool = True):
        self.cpu_watts_per_core = cpu_watts_per_core
        self._gpus = self._nvml_handles()
        self._rapl = self._rapl_files() if node_wide else {}
        self._rapl_elsewhere = not node_wide and bool(self._rapl_files())
        parts = []
        if self._gpus:
            parts.append(f"nvml: measured, {len(self._gpus)} GPU(s)")
        elif torch.cuda.is_available():
            parts.append("GPU energy NOT measured (NVML energy counter unavailable)")
        if self._rapl:
            parts.append(f"rapl: measured, {len(self._rapl)} CPU package(s)")
        elif self._rapl_elsewhere:
            parts.append("rapl: read by local rank 0 of this node")
        else:
            parts.append(
                f"cpu estimate: process CPU-seconds x {cpu_watts_per_core} W/core (RAPL not readable)"
            )
        self.method = "; ".join(parts)
        self._start = None

    def start(self) -> None:
        self._start = self._counters()

    def read(self) -> float:
        """Joules since ``start()``."""
        if self._start is None:
            raise RuntimeError("EnergyMeter.read() before start()")
        now = self._counters()
        total = 0.0
        for key, value in now.items():
            delta = value - self._start[key]
            if key.startswith("rapl:") and delta < 0:  # counter wrapped around
                delta += self._rapl[key][1]
            total += delta
        return total

    def _counters(self) -> dict[str, float]:
        """Cumulative joules per source."""
        counters = {}
        if self._gpus:
            import pynvml

            for index, handle in self._gpus.items():
                counters[f"gpu:{index}"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
        if self._rapl:
            for key, (path, _) in self._rapl.items():
                counters[key] = int(path.read_text()) / 1e6
        elif not self._rapl_elsewhere:
            counters["cpu_estimate"] = process_cpu_seconds() * self.cpu_watts_per_core
        return counters

    @staticmethod
    def _nvml_handles() -> dict:
        if not torch.cuda.is_available():
            return {}
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            uuid = torch.cuda.get_device_properties(index).uuid
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where unsupported
            return {index: handle}
        except Exception as err:
            log.warning("NVML energy counter unavailable (%s); GPU energy not measured", err)
            return {}

    @staticmethod
    def _rapl_files() -> dict[str, tuple[Path, int]]:
        found = {}
        for domain in sorted(RAPL_ROOT.glob("intel-rapl:*")):
            if domain.name.count(":") != 1:  # sub-domains (core, dram) are inside the package count
                continue
            try:
                int((domain / "energy_uj").read_text())
                wrap = int((domain / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            found[f"rapl:{domain.name}"] = (domain / "energy_uj", wrap / 1e6)
        return found


def co2e_kg(kwh: float, carbon_intensity_kg_per_kwh: float, pue: float) -> float:
    return kwh * pue * carbon_intensity_kg_per_kwh
