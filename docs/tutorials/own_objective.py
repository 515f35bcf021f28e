"""Tutorial 4: a new pre-training objective from your own folder, nothing under greenlab/ changed.

A method is a Python file (a ``PretrainingModule``: the loss in ``forward``, the optimiser, the trained
backbone, and ``needs``: what it uses of a backbone) plus two YAML files (the objective's values, and an
experiment of what differs from the groups), found through Hydra's search path. This script writes such a
folder, a rotation-prediction objective (which of 0 / 90 / 180 / 270 degrees was applied?), and runs it
end to end: pre-training, linear probes, results.json with its cost.

    python docs/tutorials/own_objective.py --out tutorial_runs/own_objective   # ~3 min on a 2-core CPU
    GREENLAB_TUTORIAL_TINY=1 python docs/tutorials/own_objective.py           # seconds: a tiny ViT
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from greenlab.results.model import Results

TINY = os.environ.get("GREENLAB_TUTORIAL_TINY") == "1"
TINY_OVERRIDES = ["img_size=32", "+backbone.model_kwargs.embed_dim=48", "+backbone.model_kwargs.depth=2",
                  "+backbone.model_kwargs.num_heads=2", "data.num_images=24", "data.batch_size=8",
                  "data.eval_batch_size=16", "data.num_workers=0", "trainer.max_epochs=1",
                  "evaluation.bootstrap_resamples=10", "evaluation.ci_resamples=10", "logger=csv"]  # fmt: skip

OBJECTIVE = '''"""Rotation prediction: L = CE(head(mean_t f(rot_k(x))_t), k), k ~ U{0, 1, 2, 3} per image."""

import torch
import torch.nn.functional as F
from torch import nn

from greenlab.contracts import require_fit
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import log_train_loss


class RotationPrediction(PretrainingModule):
    needs = ("tokens",)  # a token sequence (a ViT); a CNN is refused at start-up in one line

    def __init__(self, backbone: nn.Module, lr: float, weight_decay: float):
        super().__init__()
        require_fit(self, backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone, self.head = backbone, nn.Linear(backbone.num_features, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k = torch.randint(0, 4, (len(images),), device=images.device)
        rotated = torch.stack([torch.rot90(x, int(r), dims=(1, 2)) for x, r in zip(images, k)])
        tokens = self.backbone.forward_features(rotated)  # (B, T, D)
        return F.cross_entropy(self.head(tokens.mean(dim=1)), k)

    def training_step(self, batch, batch_idx):
        loss = self(batch[0])
        log_train_loss(self, loss, len(batch[0]))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def trained_backbone(self) -> nn.Module:
        return self.backbone
'''
OBJECTIVE_YAML = """_target_: my_objectives.RotationPrediction
backbone: ${backbone}
lr: 1.0e-4
weight_decay: 0.05
"""
EXPERIMENT_YAML = """# @package _global_
# Rotation prediction on a ViT-S/16, probed like RETFound-Green.
defaults:
  - override /backbone: vit_small_patch16
  - override /objective: rotation
  - override /data: embedded_fundus
  - override /evaluation: linear_probe

name: rotation
img_size: 64
data:
  batch_size: 32
trainer:
  max_epochs: 3
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tutorial_runs/own_objective"))
    out = parser.parse_args().out.resolve()

    # 1. Your folder: the code beside its configs (the config groups mirror greenlab/conf/).
    folder = out / "my_method"
    for path, text in {"my_objectives.py": OBJECTIVE, "conf/objective/rotation.yaml": OBJECTIVE_YAML,
                       "conf/experiment/rotation.yaml": EXPERIMENT_YAML}.items():  # fmt: skip
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    print(
        f"your method: {folder}\n  "
        + "\n  ".join(sorted(str(p.relative_to(folder)) for p in folder.rglob("*.*")))
    )

    # 2. Run it: Hydra finds the YAML through hydra.searchpath, Python the code through PYTHONPATH.
    run_dir = out / "run"
    args = [f"hydra.searchpath=[file://{folder / 'conf'}]", "+experiment=rotation",
            f"paths.data_dir={out / 'data'}", f"hydra.run.dir={run_dir}", *(TINY_OVERRIDES if TINY else [])]  # fmt: skip
    print("\n$ PYTHONPATH=" + str(folder) + " python -m greenlab " + " ".join(args))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
           "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    subprocess.run([sys.executable, "-m", "greenlab", *args], check=True, env=env)

    # 3. The same results as a built-in method: probes before / after, the cost, the recipe record.
    results = Results.from_folder(run_dir)
    print(
        f"\nexperiment: {results.experiment}; recipe: {results.recipe.experiment}, faithful {results.recipe.faithful}"
    )
    print(
        f"probe AUROC {results.metrics['probe_auroc_macro']:.3f} "
        f"(before pre-training {results.metrics['initial_backbone']['probe_auroc_macro']:.3f})"
    )
    print(f"train FLOPs {results.compute['train_flops']:.3g}, {results.energy['kwh']:.2g} kWh")
    print(f"backbone: {run_dir / 'backbone.pth'} (timm state dict; backbone.json says how to rebuild it)")


if __name__ == "__main__":
    main()
