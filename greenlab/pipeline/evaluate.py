"""Evaluate a backbone without training it: the run pipeline (greenlab/pipeline/run.py) with no objective, so
the same results.json, results.md, bootstrap.npz and W&B run as a training run, pre-training skipped (and
said so).

    python -m greenlab.evaluate backbone=retfound_meh backbone.weights=FILE evaluation=linear_probe data=...

Any backbone group, any evaluation, any data (``greenlab/conf/evaluate.yaml``). The data's ``img_size`` / ``mean`` /
``std`` follow the backbone config's where it names them (the normalisation its weights expect), unless the
command line sets them; results.json records what was used (``preprocessing``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from greenlab.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from greenlab.pipeline.run import run, sweep_value

    return sweep_value(run(cfg))  # the value a Hydra sweeper optimises
