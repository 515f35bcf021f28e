"""The global batch (issue #24): every lr rule scales with processes x accumulation x per-process batch, the
run records it, and the recipe compares it with the paper's."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from greenlab.config import build
from greenlab.objectives.optim import effective_batch_size
from tests.test_mae import tiny_mae
from tests.test_recipe import LOADED, check


class Images(L.LightningDataModule):
    """16 random 64-px images (labels unused), ``batch_size`` per process."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(
            TensorDataset(torch.randn(16, 3, 64, 64), torch.zeros(16)), batch_size=self.batch_size
        )


def test_global_batch_is_processes_x_accumulation_x_per_process_batch():
    trainer = SimpleNamespace(
        world_size=4, accumulate_grad_batches=2, datamodule=SimpleNamespace(batch_size=32)
    )
    assert effective_batch_size(trainer) == 256
    with pytest.raises(ValueError, match="datamodule"):
        effective_batch_size(SimpleNamespace(world_size=1, accumulate_grad_batches=1, datamodule=None))


def test_mae_lr_rule_uses_the_global_batch_under_gradient_accumulation():
    """MAE's lr = base_lr x eff_batch / 256 with eff_batch = batch x accum_iter x world_size (main_pretrain.py):
    batch 4 with 2 accumulation steps is a global batch of 8, set by fit itself."""
    mae = tiny_mae(base_lr=0.032, warmup_epochs=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(mae, datamodule=Images(batch_size=4))
    assert mae.effective_batch_size == 8
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.032 * 8 / 256)


def test_spark_lr_rule_uses_the_global_batch():
    """SparK's lr = base_lr x glb_batch_size / 256 (arg_util.py): batch 4 x 2 accumulation steps = 8."""
    backbone = build("backbone/nn_mobilenet", model_name="rexnet_100")
    spark = build("objective/spark", backbone=backbone, sparse_backend="masked_dense", decoder_width=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(spark, datamodule=Images(batch_size=4))
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(2.0e-4 * 8 / 256)


def test_the_recipe_compares_the_global_batch():
    """RETFound-Green's paper batch is 128: 4 processes x 32 is faithful, 4 x 128 is not, and says why."""
    weights = "backbone.weights=/w/dinov2.pth"
    assert check("retfound_green", [weights, "data.batch_size=32"], LOADED, world_size=4)["faithful"]
    assert check("retfound_green", [weights, "data.batch_size=16", "trainer.accumulate_grad_batches=2"], LOADED,
                 world_size=4)["faithful"]  # fmt: skip
    assert check("retfound_green", [weights], LOADED, world_size=4)["deviations"] == [
        {"key": "effective_batch_size", "paper": 128, "used": 512,
         "why": "override: 4 process(es) x 1 accumulation x 128 per process"}
    ]  # fmt: skip
