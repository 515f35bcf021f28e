"""Sparse convolution for masked image modelling of CNNs (SparK): a dense CNN, unchanged in its weights
and parameter names, computed on the visible positions only. Two backends with one semantics:
``masked_dense`` (dense ops re-masked) and ``minkowski`` (MinkowskiEngine sparse tensors)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

BACKENDS = ("masked_dense", "minkowski")
# The faster backend per device type as measured on our machines (benchmarks/results/sparse_backends_*.json);
# `make bench` on a user's machine writes its own measurement to ``measured_choice_path``, which wins.
DEFAULT_BACKEND = {
    "cpu": ("minkowski", "faster on a 2-core AMD EPYC in greenlab's benchmark (5.29 vs 8.52 s/step, rexnet_300, "
            "224 px, batch 8)"),
    "gpu": ("masked_dense", "no GPU measurement of both backends: masked_dense, SparK's own"),
}  # fmt: skip


def measured_choice_path(device_type: str) -> Path:
    """Where ``make bench`` records this machine's faster backend: ``$GREENLAB_HOME`` (default
    ``~/.cache/greenlab``)/``sparse_backends_<cpu|gpu>.json``."""
    home = Path(os.environ.get("GREENLAB_HOME", "~/.cache/greenlab")).expanduser()
    return home / f"sparse_backends_{device_type}.json"


def fastest_backend(device_type: str) -> tuple[str, str]:
    """(backend, why) for ``device_type`` (cpu | gpu): this machine's own measurement when ``make bench``
    has made one, else greenlab's (``DEFAULT_BACKEND``)."""
    path = measured_choice_path(device_type)
    if not path.is_file():
        return DEFAULT_BACKEND[device_type]
    result = json.loads(path.read_text())
    runs = {r["backend"]: r["step_seconds_median"] for r in result["runs"]}
    machine = result["machine"].get("gpu") or result["machine"].get("cpu")
    return result["faster_backend"], f"faster in {path} ({runs} s/step on {machine})"


INSTALL_MINKOWSKI = (
    "make install (from a checkout) or: bash scripts/install_minkowski.sh; MinkowskiEngine 0.5.4 is built from "
    "source (the [sparse] extra), see README"
)


def minkowski_missing() -> str | None:
    """Why MinkowskiEngine cannot be used here (not installed, or fails to import), or None when it can."""
    try:
        from greenlab.compat import import_minkowski

        import_minkowski()
    except Exception as err:  # ImportError, or a build for another torch (undefined symbols)
        return f"MinkowskiEngine does not import ({type(err).__name__}: {str(err).splitlines()[0]})"
    return None


def choose_backend(requested: str, device_type: str) -> tuple[str, str]:
    """(backend, why) for ``requested`` (auto | masked_dense | minkowski) on ``device_type`` (cpu | gpu).
    ``auto`` falls back to masked_dense (same semantics) when MinkowskiEngine is missing, saying so;
    ``minkowski`` asked for explicitly and missing is an error naming the install command."""
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"sparse_backend must be auto, masked_dense or minkowski, not {requested!r}")
    backend, why = fastest_backend(device_type) if requested == "auto" else (requested, "set in the config")
    missing = minkowski_missing() if backend == "minkowski" else None
    if missing and requested == "minkowski":
        raise RuntimeError(f"objective.sparse_backend=minkowski: {missing}. Install it: {INSTALL_MINKOWSKI}")
    if missing:
        return (
            "masked_dense",
            f"{missing}: masked_dense instead (same semantics; auto would pick minkowski: {why})",
        )
    return backend, why


# FLOPs of sparse kernels that torch's FlopCounterMode cannot see (MinkowskiEngine's own C++ convolutions and
# greenlab's gather-scatter depthwise loop), reported by greenlab.sparse.minkowski while a count is open.
_SPARSE_FLOPS: list[float] = []  # the open count's running total (empty: none open)


@contextlib.contextmanager
def counting_sparse_flops():
    """Within this block, sparse kernels add their FLOPs: yields a callable returning the total so far."""
    _SPARSE_FLOPS.append(0.0)
    try:
        yield lambda: _SPARSE_FLOPS[-1]
    finally:
        _SPARSE_FLOPS.pop()


def add_sparse_flops(pairs: int, multiply_adds_per_pair: int) -> None:
    """Count a sparse kernel's forward and backward: 2 FLOPs per multiply-add, x 3 for the forward, the input
    gradient and the weight gradient (each the same multiply-adds over the same kernel-map pairs)."""
    if _SPARSE_FLOPS:
        _SPARSE_FLOPS[-1] += 3 * 2 * pairs * multiply_adds_per_pair


def sparse_flops_open() -> bool:
    """Whether a count is open (kernels then look up their kernel maps' sizes)."""
    return bool(_SPARSE_FLOPS)
