"""What a run gives Weights & Biases beyond scalars: one W&B run per run folder (a resumed run continues it),
per-task metrics as a table, results.md / results.json / bootstrap.npz as files, figures as media, the
trained backbone as a model artifact (``logger.wandb.log_model``), compute and energy in the run summary."""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path

from greenlab.results.model import Results

RUN_ID_FILE = "wandb_run_id.txt"  # in the run folder: the W&B run a resumed run continues


def resume_arguments(logger_cfg, output_dir: Path) -> dict:
    """Extra WandbLogger arguments: this run folder's W&B id (made and kept on first use) and
    ``resume="allow"``; nothing for other loggers."""
    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
        return {}
    path = Path(output_dir) / RUN_ID_FILE
    if not path.is_file():  # a W&B-style id: 8 characters of [a-z0-9]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)))
    return {"id": path.read_text().strip(), "resume": "allow"}


TABLE_COLUMNS = [
    "evaluation",
    "dataset",
    "task",
    "class",
    "auroc",
    "ci_low",
    "ci_high",
    "auroc_point",
    "auprc",
]


def task_rows(results: Results) -> list[list]:
    """One row per comparison: evaluation, dataset, task, class, AUROC (headline), CI, point, AUPRC."""
    return [[c.evaluation, c.dataset, c.task, c.comparison, c.auroc, *(c.auroc_ci95 or (None, None)), c.auroc_point,
             c.auprc] for c in results.comparisons]  # fmt: skip


def log_outcome(logger, results: Results) -> None:
    """Tables, files, media, model artifact and summary of a finished run to a Lightning ``WandbLogger``."""
    import wandb

    run, folder = logger.experiment, Path(results.run_dir)
    run.summary.update({f"{s}/{k}": v for s, values in (("compute", results.compute), ("energy", results.energy))
                        for k, v in values.items() if isinstance(v, int | float | str)})  # fmt: skip
    rows = task_rows(results)
    if rows:
        run.log({"final/probe_table": wandb.Table(columns=TABLE_COLUMNS, data=rows)})
    for name in ("results.md", "results.json", "bootstrap.npz"):
        if (folder / name).is_file():
            run.save(str(folder / name), base_path=str(folder), policy="now")
    figures = sorted(folder.glob("*/*.png")) + sorted(folder.glob("*.png"))
    if figures:
        run.log({"figures": [wandb.Image(str(f), caption=f.relative_to(folder).as_posix()) for f in figures]})
    weights = results.artifacts.get("backbone_weights")
    if getattr(logger, "_log_model", False) and weights:
        artifact = wandb.Artifact(f"backbone-{run.id}", type="model",
                                  metadata={"experiment": results.experiment, "init": json.dumps(results.init)})  # fmt: skip
        for file in [Path(weights), Path(weights).with_suffix(".json")]:
            if file.is_file():
                artifact.add_file(str(file))
        hf_folder = folder / "backbone_hf"
        if hf_folder.is_dir():
            artifact.add_dir(str(hf_folder), name="backbone_hf")
        run.log_artifact(artifact)
