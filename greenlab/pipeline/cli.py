"""The command line: ``greenlab`` / ``python -m greenlab`` (Hydra). Light on purpose: a command that is
refused (bad values, a finished or busy run folder) or only asks (no argument, ``--help``) answers without
loading torch and Lightning; ``greenlab.pipeline.run`` is imported only to run. A backbone the objective
does not fit is refused in one line (in a ``-m`` sweep: that job is skipped, the others run).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import greenlab.config
from greenlab.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    if OmegaConf.is_missing(cfg.trainer, "max_epochs"):
        raise SystemExit(
            "greenlab: trainer.max_epochs is not set: choose an experiment (+experiment=NAME) or set it\n"
            + experiment_list()
        )
    try:
        greenlab.config.check_values(cfg)
    except ValueError as err:
        raise SystemExit(f"greenlab: {err}") from None
    from greenlab.contracts import UnfitBackbone
    from greenlab.pipeline.run import run, sweep_value

    try:
        return sweep_value(run(cfg))  # the value a Hydra sweeper optimises
    except UnfitBackbone as refused:  # one line; in a sweep the other jobs go on
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise SystemExit(f"greenlab: {refused}") from None
        print(f"greenlab: refused (this job of the sweep is skipped): {refused}", file=sys.stderr)
        return None


def main() -> None:
    """``python -m greenlab [overrides]``; with no argument at all, the experiments and how to run one."""
    if len(sys.argv) == 1:
        print(experiment_list())
        return
    hydra_main()


def experiment_list() -> str:
    """The experiments, one example command each (also the head of ``greenlab --help``)."""
    return (
        "greenlab experiments (greenlab +experiment=NAME [overrides]):\n"
        + greenlab.config.experiment_examples()
    )
