"""One experiment, start to end: pre-train, evaluate the frozen backbone, report what it cost.

    python -m greenlab +experiment=retfound_green [overrides]

Everything is built from the composed config with ``hydra.utils.instantiate``; see ``greenlab/conf/``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import sys
import warnings
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import greenlab
import greenlab.config
from greenlab import contracts, recipe, wandb_run
from greenlab.backbones import weights
from greenlab.callbacks.compute_monitor import JOULES_PER_KWH, ComputeMonitor
from greenlab.callbacks.interruption import EXIT_SIGTERM
from greenlab.compute.energy import co2e_kg, energy_meter
from greenlab.objectives.base import use_channels_last
from greenlab.report import write_results
from greenlab.run_folder import (
    RunLock,
    check_checkpoint,
    primary_process,
    refuse_finished,
    resume_source,
    resumed_files,
)

log = logging.getLogger("greenlab")

CONFIG_DIR = str(greenlab.config.CONFIG_DIR)


def run(cfg: DictConfig) -> dict:
    """Run the configured experiment; returns the results dict also written to results.json."""
    output_dir = Path(cfg.paths.output_dir)
    # DDP / SLURM workers run in their rank 0's folder, under its lock
    with RunLock(output_dir) if primary_process() else contextlib.nullcontext():
        return train_and_evaluate(cfg, output_dir)


def train_and_evaluate(cfg: DictConfig, output_dir: Path) -> dict:
    """``run`` inside the run folder's lock."""
    composed = OmegaConf.to_container(cfg, resolve=False)  # as composed (instantiating resolves parts of cfg)
    resume_from = resume_checkpoint(output_dir, cfg.resume.get("from"))
    L.seed_everything(cfg.seed, workers=True)

    datamodule, objective, evaluation = (
        instantiate(cfg.data),
        instantiate(cfg.objective, _convert_="all"),  # plain hparams: checkpoints load with weights_only=True
        instantiate(cfg.evaluation),
    )
    check_parts(evaluation, datamodule, objective)
    trainer, monitor = build_trainer(cfg)

    initial_backbone = copy.deepcopy(objective.trained_backbone()) if cfg.evaluate_initial_backbone else None
    layout = {
        "compiled": objective.compile_networks() if cfg.compile else [],
        "channels_last": cfg.channels_last,
    }
    if cfg.channels_last:
        for network in (objective, initial_backbone):
            if network is not None:
                use_channels_last(network)
    budget = pretrain(trainer, monitor, objective, datamodule, resume_from)
    layout["fused_optimizer"] = any(o.defaults.get("fused") for o in trainer.optimizers)  # AdamW on a GPU
    if not trainer.is_global_zero:  # the budget is reduced over all ranks; from here on rank 0 alone works
        return {"metrics": {}}
    backbone = objective.trained_backbone()
    contracts.conform(backbone, contracts.Backbone, "backbone")
    exported = objective.export(output_dir)
    described = datamodule.describe()
    timm_folder = weights.export_timm_folder(
        backbone, output_dir / "backbone_hf", described.get("preprocessing")
    )
    scores, eval_kwh = evaluate(evaluation, backbone, initial_backbone, datamodule, trainer, cfg)
    account(budget, eval_kwh, backbone, objective)
    results = {
        "recipe": paper_recipe(composed, backbone.init_record),
        "experiment": cfg.name,
        "scale": cfg.get("scale_name", "custom"),
        **record(cfg, output_dir, backbone, described, evaluation, scores),
        "objective": objective.run_notes(),
        "metrics": {**scores["metrics"], "final_train_loss": _final_loss(trainer)},
        "compute": {**budget["compute"], **layout},
        "energy": budget["energy"],
        "artifacts": {
            "backbone_weights": exported["weights"],
            "backbone_timm_folder": str(timm_folder) if timm_folder else None,
            "bootstrap": str(output_dir / "bootstrap.npz") if scores.get("arrays") else None,
            "checkpoints": str(output_dir / "checkpoints"),
            "csv_metrics": str(output_dir / "csv" / "metrics.csv"),
            "wandb_dir": str(output_dir / "wandb"),
        },
    }
    report(results, evaluation, trainer, output_dir, scores.get("arrays"))
    return results


def record(cfg: DictConfig, output_dir: Path, backbone, described: dict, evaluation, scores: dict) -> dict:
    """The parts of results.json every run has, trained or evaluated only: when, which greenlab, where, the
    initialisation, the data, the optimised metric (``cfg.optimized_metric``, else the evaluation's own;
    ``sweep_value`` refuses one that names no number, once the results are written), the embedding, the
    resolved config."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "greenlab_version": greenlab.__version__,
        "run_dir": str(output_dir.resolve()),
        "init": backbone.init_record,
        "data": described,
        "optimized_metric": cfg.optimized_metric or evaluation.optimized_metric,
        "embedding": scores["embedding"],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def sweep_value(results: dict) -> float:
    """The value of ``results["optimized_metric"]``, returned to a Hydra sweeper."""
    key, metrics = results["optimized_metric"], results["metrics"]
    if not isinstance(metrics.get(key), int | float):
        numbers = sorted(k for k, v in metrics.items() if isinstance(v, int | float))
        raise KeyError(f"optimized_metric={key!r} is not a number this evaluation reports (results are saved in "
                       f"{results['run_dir']}); it reports {numbers}")  # fmt: skip
    return float(metrics[key])


def paper_recipe(composed: dict, init_record: dict) -> dict:
    """This run's config (``composed``) against its experiment's paper recipe (greenlab/recipe.py)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    experiment, scale = hydra_cfg.runtime.choices.get("experiment"), hydra_cfg.runtime.choices.get("scale")
    if experiment is None:
        return {
            "experiment": None,
            "faithful": None,
            "deviations": [],
            "note": "no +experiment: no paper recipe",
        }
    searchpath = [f"hydra.searchpath=[{','.join(hydra_cfg.searchpath)}]"] if hydra_cfg.searchpath else []
    scales = (
        (["scale=paper"], [f"scale={scale}"]) if scale else ([], [])
    )  # an experiment without a scale: as is
    paper, scaled = (
        OmegaConf.to_container(compose("config", overrides=[f"+experiment={experiment}", *s, *searchpath]))
        for s in scales
    )
    return {"experiment": experiment, **recipe.deviations(composed, paper, scaled, init_record)}


def check_parts(evaluation, datamodule, objective=None) -> None:
    """Each part offers its contract (greenlab/contracts.py), and the datamodule what the others need
    (``objective``: None when nothing is trained, ``python -m greenlab.evaluate``)."""
    contracts.conform(evaluation, contracts.Evaluation, "evaluation")
    contracts.conform(datamodule, contracts.DataModule, "data")
    contracts.check_requirements(evaluation, "evaluation", datamodule)
    if objective is not None:
        contracts.conform(objective, contracts.Objective, "objective")
        contracts.check_requirements(objective, "objective", datamodule)


def build_trainer(cfg: DictConfig) -> tuple[L.Trainer, ComputeMonitor]:
    """The Lightning Trainer with the configured callbacks and loggers (the config logged to each)."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [
        instantiate(c, **wandb_run.resume_arguments(c, cfg.paths.output_dir)) for c in cfg.logger.values()
    ]
    monitor = next(c for c in callbacks if isinstance(c, ComputeMonitor))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, monitor


def pretrain(trainer, monitor: ComputeMonitor, objective, datamodule, resume_from: Path | None) -> dict:
    """Train the objective (continuing ``resume_from``); the budget it cost (compute, energy)."""
    warnings.filterwarnings(
        "ignore", message=".*module\\(s\\) in eval mode.*"
    )  # a frozen teacher, on purpose
    try:
        trainer.fit(objective, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except SIGTERMException:  # a SystemExit(None): would exit 0 as if the run had finished
        log.error("stopped by SIGTERM at step %d; checkpoints/last.ckpt holds it: run the same command to resume",
                  trainer.global_step)  # fmt: skip
        raise SystemExit(EXIT_SIGTERM) from None
    return monitor.summary(trainer)


def evaluate(
    evaluation, backbone, initial_backbone, datamodule, trainer, cfg: DictConfig
) -> tuple[dict, float]:
    """The evaluation of the trained backbone and, same protocol, of the one before pre-training (the gain
    is measured, not claimed); and the energy it took (kWh)."""
    meter = energy_meter(cfg.compute.energy_backend, cfg.compute.cpu_watts_per_core)
    meter.start()
    datamodule.setup("fit")
    device = trainer.strategy.root_device
    scores = evaluation(backbone, datamodule, device)
    if initial_backbone is not None:
        scores["metrics"]["initial_backbone"] = evaluation(initial_backbone, datamodule, device)["metrics"]
        scores["metrics"]["initial_backbone"].pop("probe_datasets", None)  # described once, above
    return scores, meter.read() / JOULES_PER_KWH


def account(budget: dict, eval_kwh: float, backbone, objective) -> None:
    """Whole-run energy and CO2e, and parameter counts, into ``budget``."""
    energy = budget["energy"]
    energy.update(eval_kwh=eval_kwh, kwh=energy["train_kwh"] + eval_kwh)
    energy["co2e_kg"] = co2e_kg(energy["kwh"], energy["carbon_intensity_kg_per_kwh"], energy["pue"])
    budget["compute"].update(
        params=sum(p.numel() for p in backbone.parameters()),
        trainable_params_pretraining=sum(p.numel() for p in objective.parameters() if p.requires_grad),
    )


def report(results: dict, evaluation, trainer, output_dir: Path, arrays: dict | None) -> None:
    """results.json, results.md (the evaluation's own section inside), bootstrap.npz (``arrays``), the final
    values to every logger."""
    json_path, md_path = write_results(results, output_dir, evaluation.markdown(results["metrics"]), arrays)
    log_final(trainer.loggers, trainer.global_step, results)
    print(
        f"\ngreenlab: {results['experiment']} finished\n  results: {json_path}\n  report:  {md_path}\n"
        f"  weights: {results['artifacts']['backbone_weights']}"
    )
    finish_wandb()


def resume_checkpoint(output_dir: Path, named: str | None = None) -> Path | None:
    """The checkpoint to continue an interrupted run in ``output_dir`` from (``run_folder.resume_source``),
    checked intact and safe to load (``check_checkpoint``), or None for a new run; and the bookkeeping of a
    resumed attempt.

    last.ckpt is renamed (not copied) to ``checkpoints/resumed-from-<n>.ckpt`` (the training loop writes a
    new last.ckpt as it goes); an attempt that ended before saving one continues from the same resumed-from
    file again, so retries add no copies. Resuming from an epoch checkpoint (``resume.from``) past an unusable
    last.ckpt sets that aside as ``last.unusable-<n>.ckpt``. The earlier CSV log is moved to
    ``csv/metrics.attempt-<n>.csv``; nothing is deleted.
    """
    refuse_finished(output_dir)
    chosen = resume_source(output_dir, named)
    if chosen is None or not primary_process():  # DDP / SLURM workers: checks and bookkeeping left to rank 0
        return chosen
    checkpoints = output_dir / "checkpoints"
    check_checkpoint(chosen, checkpoints)
    last = checkpoints / "last.ckpt"
    attempt = 1 + len(resumed_files(checkpoints))
    if chosen == last:
        chosen = last.rename(checkpoints / f"resumed-from-{attempt}.ckpt")
    elif last.is_file():
        last.rename(checkpoints / f"last.unusable-{attempt}.ckpt")
    metrics = output_dir / "csv" / "metrics.csv"
    if metrics.is_file():
        n = attempt
        while metrics.with_name(f"metrics.attempt-{n}.csv").exists():
            n += 1
        metrics.rename(metrics.with_name(f"metrics.attempt-{n}.csv"))
    log.warning("resuming the interrupted run in %s from %s", output_dir, chosen)
    return chosen


def _final_loss(trainer) -> float | None:
    value = trainer.callback_metrics.get("train/loss_epoch")
    return float(value) if value is not None else None


def log_final(loggers: list, step: int, results: dict) -> None:
    """The final metrics, compute, energy and embedding figures (``final/...``) to each logger; to W&B also
    the recipe's deviations and the rest of the outcome (greenlab/wandb_run.py)."""
    flat = {f"final/{k}": v for k, v in results["metrics"].items() if isinstance(v, int | float)}
    for section in ("compute", "energy", "embedding"):
        flat.update(
            {
                f"final/{section}/{k}": v
                for k, v in (results[section] or {}).items()
                if isinstance(v, int | float)
            }
        )
    deviations = [
        [str(d[k]) for k in ("key", "paper", "used", "why")] for d in results["recipe"]["deviations"]
    ]
    for lg in loggers:
        lg.log_metrics(flat, step=step)
        if isinstance(lg, WandbLogger):
            if deviations:
                lg.log_table(
                    key="recipe/deviations", columns=["key", "paper", "used", "why"], data=deviations
                )
            wandb_run.log_outcome(lg, results)
        lg.save()


def finish_wandb() -> None:
    wandb = sys.modules.get("wandb")  # imported only when a W&B logger was configured
    if wandb is not None and wandb.run is not None:
        wandb.finish()
