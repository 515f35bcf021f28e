"""One run, start to end: pre-train (when the config has an objective), evaluate the backbone, report what
it cost. ``greenlab.evaluate`` is this pipeline with no objective: the backbone as given, pre-training skipped.

    python -m greenlab +experiment=retfound_green [overrides]
    python -m greenlab.evaluate backbone=... data=... evaluation=...   (greenlab/conf/evaluate.yaml)

Everything is built from the composed config with ``hydra.utils.instantiate``; see ``greenlab/conf/``. In a
distributed run every process trains; rank 0 alone evaluates, writes the results and returns them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, read_write
from torch import nn

import greenlab
import greenlab.config
from greenlab import contracts
from greenlab.backbones import weights
from greenlab.callbacks.interruption import EXIT_SIGTERM
from greenlab.callbacks.probe_monitor import CSV_FILE as PROBE_CSV
from greenlab.callbacks.probe_monitor import PLOT_FILE as PROBE_PLOT
from greenlab.callbacks.probe_monitor import ProbeMonitor
from greenlab.compute.budget import Budget
from greenlab.compute.monitor import ComputeMonitor
from greenlab.evaluation import calibration, subgroups
from greenlab.objectives.base import use_channels_last
from greenlab.pipeline.run_folder import (
    RunLock,
    check_checkpoint,
    primary_process,
    refuse_finished,
    resume_source,
    resumed_files,
)
from greenlab.results import recipe, report, wandb_run
from greenlab.results.model import BOOTSTRAP_FILE, PREDICTIONS_FILE, Deviation, Recipe, Results

log = logging.getLogger("greenlab")

CONFIG_DIR = str(greenlab.config.CONFIG_DIR)
# what Lightning's subprocess launcher sets in rank 0's environment (its children inherit them)
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
FOLLOWED = ("img_size", "mean", "std")  # evaluation only: data keys taken from the backbone config
EVALUATION_ONLY = "none: python -m greenlab.evaluate scores the backbone as given"


@dataclass
class Pretrained:
    """What the evaluation scores: ``backbone``, and the same before pre-training (``initial``: None when
    not asked for or nothing was trained), on ``device``; what pre-training cost and left behind."""

    backbone: nn.Module
    device: torch.device
    initial: nn.Module | None = None
    compute: dict = field(default_factory=dict)
    notes: dict | None = None
    artifacts: dict = field(default_factory=dict)
    step: int = 0
    final_train_loss: float | None = None


def run(cfg: DictConfig) -> Results | None:
    """Run the configured experiment: its Results (also written to the run folder) on the reporting process,
    None on the other processes of a distributed run."""
    output_dir = Path(cfg.paths.output_dir)
    # DDP / SLURM workers run in their rank 0's folder, under its lock
    with RunLock(output_dir) if primary_process() else contextlib.nullcontext():
        return train_and_evaluate(cfg, output_dir)


def train_and_evaluate(cfg: DictConfig, output_dir: Path) -> Results | None:
    """``run`` inside the run folder's lock."""
    composed = OmegaConf.to_container(cfg, resolve=False)  # as composed (instantiating resolves parts of cfg)
    trains = "objective" in cfg
    if not trains and not primary_process():
        log.info(
            "evaluation only: rank 0 evaluates; this worker process of a DDP / SLURM job has nothing to do"
        )
        return None
    if not trains:
        refuse_finished(output_dir)
    resume_from = resume_checkpoint(output_dir, cfg.resume.get("from")) if trains else None
    L.seed_everything(cfg.seed, workers=True)
    preprocessing = None if trains else follow_backbone(cfg)
    datamodule, evaluation, budget = (
        instantiate(cfg.data),
        instantiate(cfg.evaluation),
        instantiate(cfg.compute),
    )
    objective = build_objective(cfg) if trains else None
    check_parts(evaluation, datamodule, objective)
    loggers = build_loggers(cfg, None if trains else "evaluate")
    if trains:
        pretrained = pretrain(cfg, objective, datamodule, loggers, budget, resume_from, output_dir)
        if pretrained is None:  # another process of a distributed run: rank 0 evaluates and reports
            return None
    else:
        pretrained = Pretrained(instantiate(cfg.backbone), device_for(cfg.device))
    backbone = pretrained.backbone
    contracts.conform(backbone, contracts.Backbone, "backbone")
    with budget.measure("evaluate"):
        evaluated = evaluate(evaluation, backbone, pretrained.initial, datamodule, pretrained.device)
    results = Results(
        experiment=cfg.name,
        scale=cfg.get("scale_name", "custom") if trains else "evaluation only",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        greenlab_version=greenlab.__version__,
        run_dir=str(output_dir.resolve()),
        recipe=paper_recipe(
            composed,
            backbone.init_record,
            pretrained.compute.get("world_size", 1),
            (pretrained.notes or {}).get("probe_monitor"),
        )  # fmt: skip
        if trains
        else Recipe(None, None, note="evaluation only: no pre-training, no paper recipe to compare"),
        init=backbone.init_record,
        data=datamodule.describe(),
        optimized_metric=cfg.optimized_metric or evaluation.optimized_metric,
        metrics={
            **evaluated.metrics,
            **({"final_train_loss": pretrained.final_train_loss} if trains else {}),
        },
        comparisons=evaluated.comparisons,
        embedding=evaluated.embedding,
        compute={**pretrained.compute, **parameter_counts(backbone, objective)},
        energy=budget.energy(),
        phases=budget.phases,
        objective=pretrained.notes,
        artifacts={**pretrained.artifacts, "wandb_dir": str(output_dir / "wandb")},
        config=OmegaConf.to_container(cfg, resolve=True),
        held_out=evaluated.held_out,
        predictions=evaluated.predictions,
        pretraining=None if trains else EVALUATION_ONLY,
        preprocessing=preprocessing,
    )
    results.artifacts["bootstrap"] = str(output_dir / BOOTSTRAP_FILE) if results.arrays() else None
    results.artifacts["predictions"] = str(output_dir / PREDICTIONS_FILE) if results.predictions else None
    write_report(results, evaluation, loggers, pretrained.step, output_dir)
    return results


def pretrain(cfg: DictConfig, objective, datamodule, loggers: list, budget: Budget, resume_from: Path | None,
             output_dir: Path) -> Pretrained | None:  # fmt: skip
    """Train the objective (continuing ``resume_from``) on every process; on rank 0, export what it leaves
    (backbone.pth + .json, the timm folder) and return it; None on the other ranks."""
    trainer, monitor = build_trainer(cfg, loggers, budget)
    initial = copy.deepcopy(objective.trained_backbone()) if cfg.evaluate_initial_backbone else None
    layout = {
        "compiled": objective.compile_networks() if cfg.compile else [],
        "channels_last": cfg.channels_last,
    }
    if cfg.channels_last:
        for network in (objective, initial):
            if network is not None:
                use_channels_last(network)
    warnings.filterwarnings(
        "ignore", message=".*module\\(s\\) in eval mode.*"
    )  # a frozen teacher, on purpose
    try:
        trainer.fit(objective, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except SIGTERMException:  # a SystemExit(None): would exit 0 as if the run had finished
        log.error("stopped by SIGTERM at step %d; checkpoints/last.ckpt holds it: run the same command to resume",
                  trainer.global_step)  # fmt: skip
        raise SystemExit(EXIT_SIGTERM) from None
    compute = monitor.summary(trainer)  # every rank: the budget is reduced over them
    layout["fused_optimizer"] = any(o.defaults.get("fused") for o in trainer.optimizers)  # AdamW on a GPU
    if not trainer.is_global_zero:
        return None
    finish_distributed(trainer)
    backbone = objective.trained_backbone()
    exported = objective.export(output_dir)
    timm_folder = weights.export_timm_folder(
        backbone, output_dir / "backbone_hf", datamodule.describe().get("preprocessing")
    )
    artifacts = {
        "backbone_weights": exported["weights"],
        "backbone_timm_folder": str(timm_folder) if timm_folder else None,
        "checkpoints": str(output_dir / "checkpoints"),
        "csv_metrics": str(output_dir / "csv" / "metrics.csv"),
    }
    watcher = next((c for c in trainer.callbacks if isinstance(c, ProbeMonitor) and c.enabled), None)
    notes = {**(objective.run_notes() or {}), **({"probe_monitor": watcher.summary()} if watcher else {})}
    return Pretrained(backbone, trainer.strategy.root_device, initial, {**compute, **layout}, notes or None,
                      artifacts, trainer.global_step, _final_loss(trainer))  # fmt: skip


def finish_distributed(trainer) -> None:
    """Rank 0 of a distributed run, after training: wait until the processes Lightning started have exited
    (they return right after training) and fail, naming the rank, when one did not exit cleanly (under SLURM
    or torchrun the launcher watches every process itself); then end the process group and forget the
    variables Lightning's launcher set in this process, so that the next job of a multirun starts its own."""
    workers = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    for rank, worker in enumerate(workers, start=1):
        code = worker.wait()
        if code != 0:
            raise SystemExit(f"greenlab: DDP process of rank {rank} exited with {code} after training; "
                             "no results written (its error is above)")  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if workers:
        for name in LAUNCHER_VARIABLES:
            os.environ.pop(name, None)


def sweep_value(results: Results | None) -> float | None:
    """The value of ``results.optimized_metric``, returned to a Hydra sweeper (None on the processes of a
    distributed run that do not report)."""
    if results is None:
        return None
    key, metrics = results.optimized_metric, results.headline()
    if key not in metrics:
        raise KeyError(f"optimized_metric={key!r} is not a number this evaluation reports (results are saved in "
                       f"{results.run_dir}); it reports {sorted(metrics)}")  # fmt: skip
    return float(metrics[key])


def paper_recipe(
    composed: dict, init_record: dict, world_size: int, probe_monitor: dict | None = None
) -> Recipe:
    """This run's config (``composed``, on ``world_size`` processes) against its experiment's paper recipe
    (greenlab/results/recipe.py); a schedule the probe monitor's early stopping cut is a deviation too."""
    from hydra import compose

    hydra_cfg = HydraConfig.get()
    experiment, scale = hydra_cfg.runtime.choices.get("experiment"), hydra_cfg.runtime.choices.get("scale")
    if experiment is None:
        return Recipe(None, None, note="no +experiment: no paper recipe")
    searchpath = [f"hydra.searchpath=[{','.join(hydra_cfg.searchpath)}]"] if hydra_cfg.searchpath else []
    scales = (
        (["scale=paper"], [f"scale={scale}"]) if scale else ([], [])
    )  # an experiment without a scale: as is
    paper, scaled = (
        OmegaConf.to_container(compose("config", overrides=[f"+experiment={experiment}", *s, *searchpath]))
        for s in scales
    )
    found = Recipe.from_json(
        {"experiment": experiment, **recipe.deviations(composed, paper, scaled, init_record, world_size)}
    )
    if probe_monitor and probe_monitor.get("stopped_early_at_epoch"):
        epochs = next((d for d in found.deviations if d.key == "trainer.max_epochs"), None)
        why = f"stopped early by callbacks.probe_monitor at epoch {probe_monitor['stopped_early_at_epoch']}: "
        if epochs:  # a scale had already shortened it
            epochs.used, epochs.why = (
                probe_monitor["stopped_early_at_epoch"],
                f"{epochs.why}; then {why}{probe_monitor['stop_reason']}",
            )
        else:
            found.deviations.append(Deviation("trainer.max_epochs", paper.get("trainer", {}).get("max_epochs"),
                                              probe_monitor["stopped_early_at_epoch"], why + probe_monitor["stop_reason"]))  # fmt: skip
        found.faithful = False
    return found


def build_objective(cfg: DictConfig):
    """The objective (plain hparams: checkpoints load with weights_only=True); a backbone it does not fit is
    refused naming both config options (``contracts.UnfitBackbone``)."""
    try:
        return instantiate(cfg.objective, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, contracts.UnfitBackbone):
            choices = HydraConfig.get().runtime.choices
            raise err.__cause__.named(choices.get("objective"), choices.get("backbone")) from None
        raise


def check_parts(evaluation, datamodule, objective=None) -> None:
    """Each part offers its contract (greenlab/contracts.py), and the datamodule what the others need
    (``objective``: None when nothing is trained, ``python -m greenlab.evaluate``); a datamodule that can pair
    reports with volumes does so exactly when the objective reads them (``reads_reports``)."""
    contracts.conform(evaluation, contracts.Evaluation, "evaluation")
    contracts.conform(datamodule, contracts.DataModule, "data")
    contracts.check_requirements(evaluation, "evaluation", datamodule)
    if objective is not None:
        contracts.conform(objective, contracts.Objective, "objective")
        contracts.check_requirements(objective, "objective", datamodule)
        if hasattr(datamodule, "pair_reports"):
            datamodule.pair_reports = objective.reads_reports


def build_loggers(cfg: DictConfig, job_type: str | None) -> list:
    """The configured loggers (a W&B run per run folder; ``job_type``, when given, replaces the configured one),
    the config logged to each."""
    loggers = []
    for c in cfg.logger.values():
        replaced = {"job_type": job_type} if job_type and "job_type" in c else {}
        loggers.append(instantiate(c, **wandb_run.resume_arguments(c, cfg.paths.output_dir), **replaced))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers


def build_trainer(cfg: DictConfig, loggers: list, budget: Budget) -> tuple[L.Trainer, ComputeMonitor]:
    """The Lightning Trainer with the configured callbacks, and its compute monitor, feeding ``budget``."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    monitor = next(c for c in callbacks if isinstance(c, ComputeMonitor))
    monitor.budget = budget
    workers_rerun_this_job()
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers), monitor


def workers_rerun_this_job() -> None:
    """Lightning starts a DDP run's other processes by re-running the command line (``sys.argv``) in
    HydraConfig's ``run.dir``. In a job of a multirun (``-m``) that would be the whole sweep, in another
    folder: make it this job's overrides, in this job's folder."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def evaluate(evaluation, backbone, initial_backbone, datamodule, device: torch.device):
    """The evaluation of the backbone and, same protocol, of the one before pre-training (the gain is
    measured, not claimed: ``metrics.initial_backbone``)."""
    datamodule.setup("fit")
    evaluated = evaluation(backbone, datamodule, device)
    if evaluated.predictions:
        evaluated.metrics["calibration"] = calibration.summary(evaluated.predictions)
    columns = getattr(evaluation, "subgroups", None)
    if columns and evaluated.predictions:
        evaluated.metrics["subgroups"] = subgroups.analyse(
            evaluated.predictions, datamodule.item_metadata, columns
        )
    if initial_backbone is not None:
        initial = evaluation(initial_backbone, datamodule, device).metrics
        for key in getattr(
            evaluation, "described_once", ()
        ):  # the same for both backbones: given once, above
            initial.pop(key, None)
        evaluated.metrics["initial_backbone"] = initial
    return evaluated


def parameter_counts(backbone, objective) -> dict:
    """The backbone's parameters, and the objective's trainable ones during pre-training (when it trained)."""
    counts = {"params": sum(p.numel() for p in backbone.parameters())}
    if objective is not None:
        counts["trainable_params_pretraining"] = sum(
            p.numel() for p in objective.parameters() if p.requires_grad
        )
    return counts


def write_report(results: Results, evaluation, loggers: list, step: int, output_dir: Path) -> None:
    """results.json + bootstrap.npz, results.md (the evaluation's sections inside), the final values to every
    logger, as read back from the run folder (what W&B shows is what the files hold)."""
    json_path, _ = results.write(output_dir)
    calibrated = results.metrics.get("calibration") or {}
    calibration.plot(calibrated, output_dir)
    if hasattr(evaluation, "figures"):  # an evaluation's own figures (W&B takes the run folder's PNGs)
        evaluation.figures(results, output_dir)
    watched = (
        ["", "## Probe during pre-training", "", f"![probe AUROC vs kWh]({PROBE_PLOT}) (rows: `{PROBE_CSV}`)"]
        if (output_dir / PROBE_PLOT).exists()
        else []
    )
    md_path = report.write_markdown(
        results,
        evaluation.markdown(results)
        + calibration.markdown(calibrated)
        + subgroups.markdown(results.metrics.get("subgroups") or {})
        + watched,
        output_dir,
    )
    log_final(loggers, step, Results.from_folder(output_dir))
    weights_line = (
        f"\n  weights: {results.artifacts['backbone_weights']}" if results.pretraining is None else ""
    )
    print(
        f"\ngreenlab: {results.experiment} finished\n  results: {json_path}\n  report:  {md_path}{weights_line}"
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


def follow_backbone(cfg: DictConfig) -> dict:
    """Evaluation only: give the data (and each probe dataset) the backbone config's ``FOLLOWED`` values,
    except those the command line sets; returns {key: value used, "from": ...} for results.json."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    probe_sets = (cfg.get("evaluation") or {}).get("datasets") or {}
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


def _final_loss(trainer) -> float | None:
    value = trainer.callback_metrics.get("train/loss_epoch")
    return float(value) if value is not None else None


def log_final(loggers: list, step: int, results: Results) -> None:
    """The final metrics, compute, energy and embedding figures (``final/...``) to each logger; to W&B also
    the recipe's deviations and the rest of the outcome (greenlab/results/wandb_run.py)."""
    flat = {f"final/{k}": v for k, v in results.headline().items()}
    embedding = dataclasses.asdict(results.embedding) if results.embedding else {}
    for section, values in (
        ("compute", results.compute),
        ("energy", results.energy),
        ("embedding", embedding),
    ):
        flat.update({f"final/{section}/{k}": v for k, v in values.items() if isinstance(v, int | float)})
    deviations = [[str(d.key), str(d.paper), str(d.used), str(d.why)] for d in results.recipe.deviations]
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
