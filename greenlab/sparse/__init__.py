"""Sparse convolution for masked image modelling of CNNs (SparK): a dense CNN, unchanged in its weights
and parameter names, computed on the visible positions only. Two backends with one semantics:
``masked_dense`` (dense ops re-masked) and ``minkowski`` (MinkowskiEngine sparse tensors)."""

from __future__ import annotations

import json
from pathlib import Path

BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
BACKENDS = ("masked_dense", "minkowski")


def fastest_backend(device_type: str) -> tuple[str, str]:
    """(backend, why): the faster backend in ``benchmarks/results/sparse_backends_<device_type>.json``.

    ``make bench`` rewrites that file on the machine it runs on, so after a user's own benchmark the
    choice follows their hardware. Without a measurement for this device type: masked_dense (SparK's own).
    """
    path = BENCHMARK_RESULTS / f"sparse_backends_{device_type}.json"
    if not path.is_file():
        return "masked_dense", f"no {device_type} benchmark ({path} missing): masked_dense, SparK's default"
    result = json.loads(path.read_text())
    runs = {r["backend"]: r["step_seconds_median"] for r in result["runs"]}
    machine = result["machine"].get("gpu") or result["machine"].get("cpu")
    return result["faster_backend"], f"faster in {path.name} ({runs} s/step on {machine})"
