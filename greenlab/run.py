"""One experiment, start to end: pre-train, evaluate the frozen backbone, report what it cost.

    python -m greenlab +experiment=retfound_green [overrides]

Everything is built from the composed config with ``hydra.utils.instantiate``; see ``conf/``.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import greenlab
from greenlab.callbacks.compute_monitor import JOULES_PER_KWH, ComputeMonitor
from greenlab.compute.energy import EnergyMeter, co2e_kg
from greenlab.report import write_results

log = logging.getLogger("greenlab")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the repository's conf/ (editable install)


def run(cfg: DictConfig) -> dict:
    """Run the configured experiment; returns the results dict also written to results.json."""
    output_dir = Path(cfg.paths.output_dir)
    resume_from = resume_checkpoint(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    objective = instantiate(cfg.objective)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    monitor = next(c for c in callbacks if isinstance(c, ComputeMonitor))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    initial_backbone = copy.deepcopy(objective.trained_backbone()) if cfg.evaluate_initial_backbone else None
    warnings.filterwarnings(
        "ignore", message=".*module\\(s\\) in eval mode.*"
    )  # the frozen teacher, on purpose
    # weights_only=False: the checkpoint is this run's own (its hparams hold OmegaConf containers)
    trainer.fit(objective, datamodule=datamodule, ckpt_path=resume_from, weights_only=False)
    budget = monitor.summary(trainer)  # reduced over all ranks; from here on rank 0 alone works
    if not trainer.is_global_zero:
        return {"metrics": {}}
    backbone = objective.trained_backbone()
    weights_path = save_backbone(backbone, cfg, output_dir)

    meter = EnergyMeter(cfg.compute.cpu_watts_per_core)
    meter.start()
    datamodule.setup("fit")
    evaluate = instantiate(cfg.evaluation)
    evaluation = evaluate(backbone, datamodule, trainer.strategy.root_device)
    if (
        initial_backbone is not None
    ):  # the same protocol before pre-training: the gain is measured, not claimed
        before = evaluate(initial_backbone, datamodule, trainer.strategy.root_device)
        evaluation["metrics"]["initial_backbone"] = before["metrics"]
    eval_kwh = meter.read() / JOULES_PER_KWH

    energy = budget["energy"]
    energy.update(eval_kwh=eval_kwh, kwh=energy["train_kwh"] + eval_kwh)
    energy["co2e_kg"] = co2e_kg(energy["kwh"], energy["carbon_intensity_kg_per_kwh"], energy["pue"])
    budget["compute"].update(
        params=sum(p.numel() for p in backbone.parameters()),
        trainable_params_pretraining=sum(p.numel() for p in objective.parameters() if p.requires_grad),
    )
    results = {
        "experiment": cfg.name,
        "scale": cfg.get("scale_name", "custom"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "greenlab_version": greenlab.__version__,
        "run_dir": str(output_dir.resolve()),
        "init": getattr(backbone, "greenlab_init", {"used": "unknown"}),
        "objective": getattr(objective, "run_notes", {}),
        "data": datamodule.describe(),
        "metrics": {**evaluation["metrics"], "final_train_loss": _final_loss(trainer)},
        "compute": budget["compute"],
        "energy": energy,
        "embedding": evaluation["embedding"],
        "artifacts": {
            "backbone_weights": str(weights_path),
            "checkpoints": str(output_dir / "checkpoints"),
            "csv_metrics": str(output_dir / "csv" / "metrics.csv"),
            "wandb_dir": str(output_dir / "wandb"),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    json_path, md_path = write_results(results, output_dir)
    _log_final(trainer, results)
    print(
        f"\ngreenlab: {cfg.name} finished\n  results: {json_path}\n  report:  {md_path}\n  weights: {weights_path}"
    )
    _finish_wandb()
    return results


def resume_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint to continue an interrupted run in ``output_dir`` from, or None for a new run.

    A finished run (results.json) or one that finished training (backbone.pth) is never touched. An
    interrupted one continues from ``checkpoints/last.ckpt``: that file is first copied to
    ``checkpoints/resumed-from-<n>.ckpt`` (the training loop replaces last.ckpt as it goes), and the
    earlier CSV log is moved to ``csv/metrics.attempt-<n>.csv``; nothing is deleted.
    """
    for done, what in (("results.json", "a finished run"), ("backbone.pth", "a run that finished training")):
        if (output_dir / done).exists():
            raise FileExistsError(
                f"{output_dir} already holds {what} ({done}); choose a new output directory"
            )
    checkpoints = output_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    if not last.is_file():
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            raise FileExistsError(f"{checkpoints} holds checkpoints but no last.ckpt to resume from")
        return None
    if not _primary_process():  # DDP / SLURM workers: the same state, bookkeeping left to rank 0
        return last
    attempt = 1 + len(list(checkpoints.glob("resumed-from-*.ckpt")))
    kept = checkpoints / f"resumed-from-{attempt}.ckpt"
    shutil.copy2(last, kept)
    metrics = output_dir / "csv" / "metrics.csv"
    if metrics.is_file():
        metrics.rename(metrics.with_name(f"metrics.attempt-{attempt}.csv"))
    log.warning("resuming the interrupted run in %s from %s (kept as %s)", output_dir, last, kept.name)
    return kept


def _primary_process() -> bool:
    """False in the worker processes a DDP launcher or SLURM starts (before Lightning knows its rank)."""
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def save_backbone(backbone: torch.nn.Module, cfg: DictConfig, output_dir: Path) -> Path:
    """The trained backbone alone as a state dict (+ a JSON saying how to rebuild it); never overwrites."""
    path = output_dir / "backbone.pth"
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite trained weights")
    torch.save(backbone.state_dict(), path)
    recipe = {
        "factory": cfg.backbone._target_,
        **{
            k: v
            for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items()
            if k not in ("_target_", "weights")
        },
    }
    if "text_encoder" in cfg:  # an image-text model (GreenRFM): both encoders, projections, classifier
        factory = f"{type(backbone).__module__}.{type(backbone).__name__}"
        recipe = {"factory": factory, "image_encoder": recipe, "num_features": backbone.num_features,
                  "text_encoder": OmegaConf.to_container(cfg.get("text_encoder", {}), resolve=True)}  # fmt: skip
    (output_dir / "backbone.json").write_text(json.dumps(recipe, indent=2))
    return path


def _final_loss(trainer) -> float | None:
    value = trainer.callback_metrics.get("train/loss_epoch")
    return float(value) if value is not None else None


def _log_final(trainer, results: dict) -> None:
    flat = {f"final/{k}": v for k, v in results["metrics"].items() if isinstance(v, int | float)}
    for section in ("compute", "energy", "embedding"):
        flat.update(
            {f"final/{section}/{k}": v for k, v in results[section].items() if isinstance(v, int | float)}
        )
    for lg in trainer.loggers:
        lg.log_metrics(flat, step=trainer.global_step)
        lg.save()


def _finish_wandb() -> None:
    wandb = sys.modules.get("wandb")  # imported only when a W&B logger was configured
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    results = run(cfg)
    return results["metrics"].get("probe_auroc_macro")  # the value a Hydra sweeper optimises
