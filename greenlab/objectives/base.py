"""What every pre-training objective gives the run beyond its maths (greenlab/contracts.py ``Objective``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn

from greenlab.backbones import weights
from greenlab.objectives.optim import effective_batch_size

# tensor rank -> channels-last memory format (under `channels_last: true`)
LAYOUTS = {4: torch.channels_last, 5: torch.channels_last_3d}


def use_channels_last(module: nn.Module) -> None:
    """Convolution weights (and so activations) in channels-last layout: 4-D weights (2D convs) as
    ``channels_last`` (NHWC), 5-D weights (3D convs) as ``channels_last_3d`` (NDHWC). ``Module.to`` takes one
    format, and the 2D one refuses 5-D tensors."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() in LAYOUTS:
            tensor.data = tensor.data.contiguous(memory_format=LAYOUTS[tensor.dim()])


class PretrainingModule(L.LightningModule):
    """Base class of the objectives. A subclass defines the loss (``forward``, ``training_step``),
    ``configure_optimizers`` and ``trained_backbone``; ``requires`` lists the protocols its datamodule must
    satisfy (greenlab/contracts.py); ``needs`` the backbone capabilities it uses (``require_fit``, the first
    line of its ``__init__`` after ``super().__init__()``)."""

    requires: tuple[type, ...] = ()
    needs: tuple[
        str, ...
    ] = ()  # what it needs of its backbone (greenlab.contracts.CAPABILITIES): checked first
    # the submodules torch.compile'd under `compile: true` ("" = the whole forward)
    compiled: tuple[str, ...] = ("",)
    # True: training batches are (volumes, reports, labels); the pipeline has the datamodule pair them
    reads_reports: bool = False
    effective_batch_size: int | None = None  # the global batch of an optimiser step, set at the start of fit

    def setup(self, stage: str) -> None:
        """At the start of fit, before ``configure_optimizers``: the global batch the lr rules use."""
        if stage == "fit":
            self.effective_batch_size = effective_batch_size(self.trainer)

    def trained_backbone(self) -> nn.Module:
        raise NotImplementedError

    def compile_networks(self, **options) -> list[str]:
        """``torch.compile`` the ``compiled`` submodules in place (``nn.Module.compile``: parameter names,
        checkpoints and the exported backbone are unchanged); returns their names for results.json."""
        for name in self.compiled:
            self.get_submodule(name).compile(**options)
        return [name or "forward" for name in self.compiled]

    def run_notes(self) -> dict:
        """Choices made at run time (e.g. a backend picked by measurement), for results.json."""
        return {}

    def export(self, output_dir: Path) -> dict:
        """The trained backbone alone: ``backbone.pth`` + ``backbone.json`` (how to rebuild it); the recipe."""
        return weights.export(self.trained_backbone(), Path(output_dir))
