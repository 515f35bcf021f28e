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

    def fold_transforms(self, img_size: int | None) -> tuple:
        """(training, scoring) transforms of a fold's samples (img_size: 2D photographs' size, None: the
        data's own)."""
        ...


@runtime_checkable
class TextAligned(Protocol):
    """An image-text model: image latents from ``forward``, report latents from ``encode_text``."""

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...


# What a backbone can offer a pre-training objective (``PretrainingModule.needs``): name -> what it is, in words.
CAPABILITIES = {
    "tokens": "a token sequence (a ViT: patch embedding, prefix tokens, blocks)",
    "position_table": "a position embedding table over the patch grid (pos_embed)",
    "hierarchy": "a CNN feature hierarchy in powers of two up to stride 32, in 3D up to the network's own total "
    "stride (tap_names, strides, channels)",
    "feature_map": "a CNN's stem output grid and final feature map (stem_name; forward_features (B, C, h, w))",
    "images": "2D images (B, C, H, W)",
    "volumes": "3D volumes (B, C, D, H, W)",
}


class UnfitBackbone(TypeError):
    """An objective was given a backbone that lacks a capability it needs (raised before any training):
    ``needed`` and ``offered`` in words, ``objective`` and ``backbone`` the names (class names, or the config
    options' names once the pipeline knows them: ``named``)."""

    def __init__(self, objective: str, needed: str, backbone: str, offered: str):
        self.objective, self.needed, self.backbone, self.offered = objective, needed, backbone, offered
        super().__init__(f"objective {objective} needs {needed}; backbone {backbone} is {offered}")

    def named(self, objective: str, backbone: str) -> UnfitBackbone:
        return UnfitBackbone(objective, self.needed, backbone, self.offered)


def capabilities(backbone: nn.Module) -> set[str]:
    """What ``backbone`` offers (keys of ``CAPABILITIES``), read from the model: a timm ViT's token members
    and position table, a CNN's hierarchy (greenlab/backbones/hierarchy.py) and stem, 3D when its
    convolutions are 3D."""
    from greenlab.backbones.hierarchy import DOWNSAMPLE, is_hierarchy, spatial_dims

    found = {"volumes" if spatial_dims(backbone) == 3 else "images"}
    if all(hasattr(backbone, name) for name in ("patch_embed", "blocks", "num_prefix_tokens")):
        found.add("tokens")
        if getattr(backbone, "pos_embed", None) is not None:
            found.add("position_table")
    total = None if "volumes" in found else DOWNSAMPLE  # SparK's 32 in 2D; a 3D encoder's own
    if hasattr(backbone, "tap_names") and is_hierarchy(list(backbone.strides), total):
        found.add("hierarchy")
    if hasattr(backbone, "stem_name"):
        found.add("feature_map")
    return found


def describe(backbone: nn.Module) -> str:
    """What a backbone is, in the words of a refusal: its most specific capabilities."""
    offered = capabilities(backbone)
    kind = next((k for k in ("hierarchy", "feature_map", "tokens") if k in offered), None)
    shape = "3D" if "volumes" in offered else "2D"
    words = {
        "hierarchy": "CNN feature hierarchy",
        "feature_map": "CNN feature map",
        "tokens": "token sequence",
    }
    return f"a {shape} " + (words.get(kind) or "network with pooled features only")


def require_fit(objective, backbone: nn.Module) -> None:
    """Refuse ``backbone`` when it lacks what ``objective`` declares it ``needs``, naming both and the gap.
    A need is a capability, or a tuple of capabilities of which one is enough."""
    missing = unmet(objective.needs, capabilities(backbone))
    if missing:
        needed = " and ".join(" or ".join(CAPABILITIES[a] for a in alternatives(m)) for m in missing)
        raise UnfitBackbone(type(objective).__name__, needed, type(backbone).__name__, describe(backbone))


def unmet(needs: tuple, offered: set[str]) -> list:
    """The entries of ``needs`` (capabilities, or tuples of alternatives) that ``offered`` does not meet."""
    return [need for need in needs if not set(alternatives(need)) & offered]


def alternatives(need: str | tuple[str, ...]) -> tuple[str, ...]:
    return (need,) if isinstance(need, str) else tuple(need)


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
