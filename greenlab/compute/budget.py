"""What a run costs, by phase: wall seconds and joules, then kWh and kg CO2e (kWh x PUE x grid intensity).

One ``Budget`` per run, built from ``cfg.compute`` (greenlab/conf/compute/default.yaml; nothing else reads
it). The pre-training phase is fed by ``ComputeMonitor`` (greenlab/compute/monitor.py: over every process of
a distributed run, resumed attempts included); the evaluation phase is measured by ``measure``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from greenlab.compute.energy import co2e_kg, energy_meter, grid_intensity
from greenlab.results.model import Phase

JOULES_PER_KWH = 3.6e6
PHASE_KWH_KEYS = {"pretrain": "train_kwh", "evaluate": "eval_kwh"}  # results.json energy keys


class Budget:
    """Args: region / carbon_intensity_kg_per_kwh (the grid: ``energy.grid_intensity``), pue,
    energy_backend / cpu_watts_per_core (``energy.energy_meter``)."""

    def __init__(self, region: str | None, carbon_intensity_kg_per_kwh: float, pue: float, energy_backend: str,
                 cpu_watts_per_core: float):  # fmt: skip
        self.grid = grid_intensity(region, carbon_intensity_kg_per_kwh)
        self.pue, self.energy_backend, self.cpu_watts_per_core = pue, energy_backend, cpu_watts_per_core
        self.phases: dict[str, Phase] = {}

    def meter(self, node_wide: bool = True):
        """A new energy meter of the configured backend (``node_wide``: this process reads node counters)."""
        return energy_meter(self.energy_backend, self.cpu_watts_per_core, node_wide=node_wide)

    def co2e_kg(self, kwh: float) -> float:
        return co2e_kg(kwh, self.grid["kg_per_kwh"], self.pue)

    def add(self, phase: str, seconds: float, joules: float, method: str) -> Phase:
        """Record what ``phase`` cost (``seconds`` of wall time, ``joules``)."""
        kwh = joules / JOULES_PER_KWH
        self.phases[phase] = Phase(seconds, kwh, self.co2e_kg(kwh), method)
        return self.phases[phase]

    @contextmanager
    def measure(self, phase: str):
        """Time and meter the work inside the ``with`` block as ``phase``."""
        meter = self.meter()
        meter.start()
        started = time.perf_counter()
        yield
        self.add(phase, time.perf_counter() - started, meter.read(), meter.method)

    def energy(self) -> dict:
        """results.json's ``energy``: kWh per phase (``train_kwh``, ``eval_kwh``), the whole run's kWh and
        CO2e, the grid intensity and its source, the PUE, how it was measured."""
        kwh = sum(p.kwh for p in self.phases.values())
        methods = dict.fromkeys(p.energy_method for p in self.phases.values())
        return {
            **{PHASE_KWH_KEYS[name]: p.kwh for name, p in self.phases.items()},
            "kwh": kwh,
            "co2e_kg": self.co2e_kg(kwh),
            "carbon_intensity_kg_per_kwh": self.grid["kg_per_kwh"],
            "carbon_intensity_source": self.grid["source"],
            "pue": self.pue,
            "method": "; ".join(methods) or "not measured",
        }
