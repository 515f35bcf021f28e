"""The contracts between the parts of a run: what the pipeline (``greenlab/pipeline``) and the results
(``greenlab/results``) may rely on, and nothing else.

A run composes four parts from the config (``greenlab/conf/``): a backbone, an objective that pre-trains it, a
datamodule, and an evaluation. Each part is a plain class of its own package; these protocols say what
each one offers the pipeline. ``check_requirements`` refuses, before any training, a datamodule that
lacks what the objective or the evaluation declares it needs (``requires``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    """A network whose features downstream tasks use.

    ``forward_features(x)``: tokens (B, T, D), maps (B, C, *spatial) or vectors (B, E);
    ``num_features``: the width of one pooled vector; ``init_record``: the initialisation actually used,
    ``{"requested", "used", "source", "note"}`` (or one such record per part, e.g. ``{"image", "text"}``);
    ``recipe``: how to rebuild it, ``{"factory": "module.callable", **arguments}`` (no weights).
    """

    num_features: int
    init_record: dict
    recipe: dict

    def forward_features(self, x) -> torch.Tensor: ...


@runtime_checkable
class Objective(Protocol):
    """A LightningModule that pre-trains a backbone.

    ``trained_backbone()``: the part downstream tasks keep; ``export(output_dir)``: save what the run leaves
    behind (never overwriting) and return the recipe written beside it; ``run_notes()``: choices made at
    run time, for results.json; ``requires``: protocols the datamodule must satisfy.
    """

    requires: tuple[type, ...]

    def trained_backbone(self) -> nn.Module: ...

    def export(self, output_dir: Path) -> dict: ...

    def run_notes(self) -> dict: ...


@runtime_checkable
class Evaluation(Protocol):
    """Scores a frozen (or fine-tuned copy of a) backbone on a datamodule's labelled sets.

    ``__call__(backbone, datamodule, device)`` -> ``greenlab.results.model.Evaluated``: its metrics, the
    comparisons it scored (with their bootstrap draws, saved in bootstrap.npz), the held-out sets, the
    embedding; ``markdown(results)``: its sections of results.md (``results``: the run's ``Results``; the
    comparisons table is the report's own); ``optimized_metric``: the metrics key a sweeper optimises;
    ``requires``: protocols the datamodule must satisfy.
    """

    requires: tuple[type, ...]
    optimized_metric: str

    def __call__(self, backbone: nn.Module, datamodule, device: torch.device) -> dict: ...

    def markdown(self, results) -> list[str]: ...


@runtime_checkable
class DataModule(Protocol):
    """A LightningDataModule with label tasks and held-out probe sets.

    ``tasks``: one ``Task`` per label column; ``probe_dataloaders()``: (probe-train, held-out) loaders of
    ``(image, labels)``; ``held_out_ids()``: the held-out items' ids in that loader's order;
    ``dataset_name``: what evaluations and ``greenlab.compare`` call the data; ``describe()``: sizes, tasks
    and split for results.json.
    """

    tasks: list
    dataset_name: str

    def probe_dataloaders(self) -> tuple: ...

    def held_out_ids(self) -> list[str]: ...

    def describe(self) -> dict: ...


@runtime_checkable
class ReportsSource(Protocol):
    """Data with a free-text report per study, in the order of the probe sets."""

    train_reports: list[str]
    test_reports: list[str]


@runtime_checkable
class FoldSource(Protocol):
    """Data whose labelled sets can be re-split and re-augmented (k-fold fine-tuning)."""

    probe_train_set: object
    probe_test_set: object
    img_size: int
    mean: list[float]
    std: list[float]


@runtime_checkable
class TextAligned(Protocol):
    """An image-text model: image latents from ``forward``, report latents from ``encode_text``."""

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...


def conform(part, protocol: type, role: str) -> None:
    """Raise a clear error when ``part`` (the run's ``role``: objective, backbone, ...) lacks a member of
    ``protocol``."""
    if not isinstance(part, protocol):
        raise TypeError(
            f"{role} {type(part).__name__} is not a greenlab.contracts.{protocol.__name__}: it has no "
            f"{', '.join(_missing(part, protocol))}"
        )


def check_requirements(part, role: str, datamodule) -> None:
    """Raise a clear error when ``datamodule`` lacks a protocol that ``part`` (the objective or the
    evaluation, named by ``role``) declares in ``requires``."""
    for protocol in part.requires:
        if not isinstance(datamodule, protocol):
            raise TypeError(
                f"{role} {type(part).__name__} needs a datamodule that is a {protocol.__name__} "
                f"({protocol.__doc__.splitlines()[0].rstrip('.')}); {type(datamodule).__name__} has no "
                f"{', '.join(_missing(datamodule, protocol))}"
            )


def _missing(part, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``part`` lacks, sorted."""
    methods = [
        n for n, v in vars(protocol).items() if callable(v) and (n == "__call__" or not n.startswith("_"))
    ]
    return sorted(n for n in (*protocol.__annotations__, *methods) if not hasattr(part, n))
