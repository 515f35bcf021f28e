"""Evaluate a backbone without training it: the same results.json, results.md, bootstrap.npz and W&B run as a
training run, the pre-training sections absent (and said so).

    python -m greenlab.evaluate backbone=retfound_meh backbone.weights=FILE evaluation=linear_probe data=...

Any backbone group, any evaluation, any data (``greenlab/conf/evaluate.yaml``). The data's ``img_size`` / ``mean`` /
``std`` follow the backbone config's where it names them (the normalisation its weights expect), unless the
command line sets them; results.json records what was used (``preprocessing``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from greenlab import contracts, wandb_run
from greenlab.callbacks.compute_monitor import JOULES_PER_KWH
from greenlab.compute.energy import co2e_kg, energy_meter, grid_intensity
from greenlab.report import write_results
from greenlab.run import CONFIG_DIR, check_parts, finish_wandb, log_final, record, sweep_value

FOLLOWED = ("img_size", "mean", "std")  # data keys taken from the backbone config


def evaluate_only(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.backbone`` as configured; returns the results dict also written to results.json."""
    output_dir = Path(cfg.paths.output_dir)
    if (output_dir / "results.json").exists():
        raise FileExistsError(
            f"{output_dir} already holds a finished run (results.json); choose a new folder"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    preprocessing = follow_backbone(cfg)
    backbone, datamodule, evaluation = (
        instantiate(cfg.backbone),
        instantiate(cfg.data),
        instantiate(cfg.evaluation),
    )
    contracts.conform(backbone, contracts.Backbone, "backbone")
    check_parts(evaluation, datamodule)
    loggers = [instantiate(c, **({"job_type": "evaluate"} if "job_type" in c else {}),
                           **wandb_run.resume_arguments(c, output_dir)) for c in cfg.logger.values()]  # fmt: skip
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    energy = cfg.compute
    grid = grid_intensity(energy.region, energy.carbon_intensity_kg_per_kwh)
    meter = energy_meter(energy.energy_backend, energy.cpu_watts_per_core)
    meter.start()
    datamodule.setup("fit")
    scores = evaluation(backbone, datamodule, device_for(cfg.device))
    kwh = meter.read() / JOULES_PER_KWH
    results = {
        "recipe": {
            "experiment": None,
            "faithful": None,
            "deviations": [],
            "note": "evaluation only: no pre-training, no paper recipe to compare",
        },  # fmt: skip
        "experiment": cfg.name,
        "scale": "evaluation only",
        **record(cfg, output_dir, backbone, datamodule.describe(), evaluation, scores),
        "objective": None,
        "pretraining": "none: python -m greenlab.evaluate scores the backbone as given",
        "preprocessing": preprocessing,
        "metrics": scores["metrics"],
        "compute": {"params": sum(p.numel() for p in backbone.parameters())},
        "energy": {
            "eval_kwh": kwh,
            "kwh": kwh,
            "co2e_kg": co2e_kg(kwh, grid["kg_per_kwh"], energy.pue),
            "carbon_intensity_kg_per_kwh": grid["kg_per_kwh"],
            "carbon_intensity_source": grid["source"],
            "pue": energy.pue,
            "method": meter.method,
        },
        "artifacts": {
            "bootstrap": str(output_dir / "bootstrap.npz") if scores.get("arrays") else None,
            "wandb_dir": str(output_dir / "wandb"),
        },
    }
    json_path, md_path = write_results(results, output_dir, evaluation.markdown(results["metrics"]),
                                       scores.get("arrays"))  # fmt: skip
    log_final(loggers, 0, results)
    print(f"\ngreenlab: evaluation finished\n  results: {json_path}\n  report:  {md_path}")
    finish_wandb()
    return results


def follow_backbone(cfg: DictConfig) -> dict:
    """Give the data (and each probe dataset) the backbone config's ``FOLLOWED`` values, except those the
    command line sets; returns {key: value used, "from": ...} for results.json."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    probe_sets = cfg.evaluation.get("datasets") or {}
    backbone, used = OmegaConf.to_container(cfg.backbone, resolve=True), {}
    for key in FOLLOWED:
        if key not in backbone:
            continue
        value = backbone[key]
        for path, node in [
            ("data", cfg.data),
            *((f"evaluation.datasets.{n}", d) for n, d in probe_sets.items()),
        ]:
            if key in node and f"{path}.{key}" not in given:
                node[key] = value
        used[key] = value
    return {**used, "from": "the backbone config (data.* on the command line wins)"}


def device_for(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    results = evaluate_only(cfg)
    return sweep_value(results)  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
