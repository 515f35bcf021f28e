"""Energy used by a stretch of work, from the best source the machine offers, with the method named.

- GPUs: NVML's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ) of each GPU this
  process uses: measured.
- CPU: Intel/AMD RAPL counters when readable: every package domain (``intel-rapl:N``) and each DRAM
  sub-domain (``intel-rapl:N:M`` named ``dram``; the package count excludes memory): measured, whole
  machine (other processes included). Otherwise an ESTIMATE: CPU-seconds of this process and its finished
  children x ``cpu_watts_per_core``.

kWh -> CO2e: kWh x PUE x grid carbon intensity (kg CO2e / kWh): the country's (``compute.region``, from
``carbon_intensity.csv`` shipped beside this file, its source and year in its header) or, unset, the
configured world average.
"""

from __future__ import annotations

import csv
import logging
import resource
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RAPL_ROOT = Path("/sys/class/powercap")
CARBON_TABLE = Path(__file__).with_name("carbon_intensity.csv")


@cache
def carbon_table() -> dict[str, dict]:
    """{ISO 3166 alpha-3 code: {"country", "kg_co2e_per_kwh", "year"}} from ``CARBON_TABLE``."""
    with CARBON_TABLE.open() as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {r["iso3"]: {"country": r["country"], "kg_co2e_per_kwh": float(r["kg_co2e_per_kwh"]),
                            "year": int(r["year"])} for r in rows}  # fmt: skip


def grid_intensity(region: str | None, world_kg_per_kwh: float) -> dict:
    """{"kg_per_kwh", "source"}: the country ``region`` (alpha-3 code or English name, any case) from the
    shipped table, or ``world_kg_per_kwh`` when ``region`` is None. An unknown region is an error."""
    if region is None:
        return {"kg_per_kwh": world_kg_per_kwh,
                "source": "compute.carbon_intensity_kg_per_kwh (world average unless set; compute.region unset)"}  # fmt: skip
    table = carbon_table()
    key = str(region).strip().upper()
    code = key if key in table else next((c for c, r in table.items() if r["country"].upper() == key), None)
    if code is None:
        raise ValueError(
            f"compute.region={region!r}: not a country code or name in {CARBON_TABLE} (e.g. FRA, DEU, USA, GBR)"
        )
    row = table[code]
    return {"kg_per_kwh": row["kg_co2e_per_kwh"],
            "source": f"{row['country']} ({code}) {row['year']}: Our World in Data / Ember ({CARBON_TABLE.name})"}  # fmt: skip


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
            dram = sum(k.count(":") == 2 for k in self._rapl)
            parts.append(f"rapl: measured, {len(self._rapl) - dram} CPU package(s), {dram} DRAM domain(s)")
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
        """Readable package domains and their DRAM sub-domains (core / uncore sub-domains are inside the
        package count; psys covers the packages: both left out)."""
        found = {}
        for domain in sorted(RAPL_ROOT.glob("intel-rapl:*")):
            try:
                name = (domain / "name").read_text().strip()
            except OSError:
                name = ""
            is_package = domain.name.count(":") == 1 and name != "psys"
            if not (is_package or name == "dram"):
                continue
            try:
                int((domain / "energy_uj").read_text())
                wrap = int((domain / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            found[f"rapl:{domain.name}"] = (domain / "energy_uj", wrap / 1e6)
        return found


class CodeCarbonMeter:
    """The same ``start()`` / ``read()`` / ``method`` from codecarbon's ``OfflineEmissionsTracker``
    (``compute.energy_backend=codecarbon``): RAPL or its CPU model's TDP x load, plus a RAM power
    estimate, plus NVML for GPUs. It counts more than greenlab's own meter where RAPL is not readable (the RAM
    estimate) and fewer kinds of exactness: ``method`` says which sources it used."""

    def __init__(self, measure_power_secs: float = 1.0):
        try:
            from codecarbon import OfflineEmissionsTracker
        except ImportError as err:
            raise ImportError(
                "compute.energy_backend=codecarbon needs codecarbon: pip install codecarbon"
            ) from err
        self._tracker = OfflineEmissionsTracker(country_iso_code="USA", save_to_file=False, log_level="error",
                                                measure_power_secs=measure_power_secs)  # fmt: skip
        self.method = "codecarbon"

    def start(self) -> None:
        self._tracker.start()
        hardware = ", ".join(type(h).__name__ for h in getattr(self._tracker, "_hardware", []))
        self.method = f"codecarbon {_version('codecarbon')}: {hardware or 'its hardware probes'}"

    def read(self) -> float:
        """Joules since ``start()`` (codecarbon's running total, refreshed now)."""
        self._tracker.flush()
        return self._tracker._total_energy.kWh * 3.6e6  # codecarbon keeps no public running total


def energy_meter(backend: str, cpu_watts_per_core: float, node_wide: bool = True):
    """``greenlab`` (EnergyMeter: NVML + RAPL, else a labelled CPU estimate) or ``codecarbon``."""
    if backend == "greenlab":
        return EnergyMeter(cpu_watts_per_core, node_wide=node_wide)
    if backend == "codecarbon":
        return CodeCarbonMeter()
    raise ValueError(f"compute.energy_backend must be greenlab or codecarbon, not {backend!r}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def co2e_kg(kwh: float, carbon_intensity_kg_per_kwh: float, pue: float) -> float:
    return kwh * pue * carbon_intensity_kg_per_kwh
