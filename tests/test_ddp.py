"""Distributed runs through the README's command lines: DDP on 2 CPU processes (gloo) equals one process of the
same global batch, a failed rank fails the command, -m sweeps under DDP, evaluation on rank 0 alone; SLURM's
launcher config."""

import json

import pytest
from hydra import compose, initialize_config_dir

from greenlab.config import CONFIG_DIR
from tests.conftest import TINY_RUN, run_cli, run_tiny

DETERMINISTIC = [
    "objective.noise_std=0",
    "objective.max_corruption_ratio=0",
    "data.augmentation=none",
]  # no RNG
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


@pytest.mark.parametrize("augment_on", ["auto", "device"])
def test_ddp_command_line_matches_one_process_of_the_same_global_batch(augment_on, tmp_path, data_dir):
    """The README's DDP command (the main experiment's command line, tiny): 2 gloo processes x 4 = one
    process x 8 (the same images in each global batch: the (seed, epoch) order split across ranks). Exit 0,
    one results.json and W&B run by rank 0 alone, the probe metrics equal, images and FLOPs counted once, the
    global batch recorded and checked against the paper's the same way. Pixel noise and token corruption off:
    they draw from each process's own random stream. With data.augment_on=device each rank resizes its own
    stored-pixel batch on its device (auto: the workers, on a CPU)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    where = [f"data.augment_on={augment_on}"]
    proc = run_tiny(ddp, data_dir, *DETERMINISTIC, *DDP, *where, "data.batch_size=4")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    run_tiny(single, data_dir, *DETERMINISTIC, *where, "data.batch_size=8")
    assert sorted(p.name for p in ddp.rglob("results.json") if "wandb" not in p.parts) == ["results.json"]
    a, b = (json.loads((d / "results.json").read_text()) for d in (ddp, single))
    ran_on = "device" if augment_on == "device" else "workers"
    assert a["data"]["augment_on"]["ran_on"] == b["data"]["augment_on"]["ran_on"] == ran_on
    assert a["compute"]["world_size"] == 2 and b["compute"]["world_size"] == 1
    assert a["compute"]["effective_batch_size"] == b["compute"]["effective_batch_size"] == 8
    assert a["metrics"]["final_train_loss"] == pytest.approx(b["metrics"]["final_train_loss"], rel=1e-4)
    for task in ("haemorrhages", "hard_exudates", "grade"):
        assert a["metrics"]["probe_tasks"][task]["auroc"] == pytest.approx(
            b["metrics"]["probe_tasks"][task]["auroc"]
        )
    assert a["metrics"]["probe_auroc_macro"] == pytest.approx(b["metrics"]["probe_auroc_macro"])
    for key in ("train_images_seen", "optimizer_steps", "train_flops"):
        assert a["compute"][key] == b["compute"][key], key
    batch = {d["key"]: d for d in a["recipe"]["deviations"]}["effective_batch_size"]
    assert (batch["paper"], batch["used"]) == (128, 8) and "2 process(es)" in batch["why"]
    assert len(list((ddp / "wandb").glob("offline-run-*"))) == 1


def test_ddp_run_fails_when_another_rank_fails(tmp_path, data_dir):
    """A rank that fails after training fails the command (no race with rank 0's evaluation), and no
    results are written."""
    run_dir = tmp_path / "run"
    proc = run_tiny(run_dir, data_dir, *DDP, "data.batch_size=4", "trainer.max_epochs=1",
                    "+callbacks.fail._target_=tests.helpers.FailOnRank", "+callbacks.fail.rank=1", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "FailOnRank: rank 1 fails on purpose" in proc.stderr + proc.stdout
    assert not (run_dir / "results.json").exists()


def test_ddp_multirun_gives_one_complete_run_per_job(tmp_path, data_dir):
    """``-m`` under DDP: each job's worker process runs that job (not the whole sweep) in that job's folder."""
    sweep = tmp_path / "sweep"
    run_cli("-m", "+experiment=retfound_green", *TINY_RUN, *DDP, "data.batch_size=4", "trainer.max_epochs=1",
            "evaluate_initial_backbone=false", "seed=1,2", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}")  # fmt: skip
    runs = [json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1")]
    assert [r["config"]["seed"] for r in runs] == [1, 2]
    assert all(r["compute"]["world_size"] == 2 and "probe_auroc_macro" in r["metrics"] for r in runs)
    assert sorted(p.parent.name for p in sweep.rglob("results.json") if "wandb" not in p.parts) == ["0", "1"]


def test_evaluate_in_a_worker_process_leaves_it_to_rank_0(tmp_path, data_dir, monkeypatch):
    """python -m greenlab.evaluate started on every task of a DDP / SLURM job: only rank 0 evaluates."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    run_dir = tmp_path / "eval"
    run_cli("backbone.weights=random", "img_size=28", "+backbone.model_kwargs.embed_dim=48", "+backbone.model_kwargs.depth=2",
            "+backbone.model_kwargs.num_heads=2", "data.num_images=24", "data.num_workers=0",
            f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", module="greenlab.evaluate")  # fmt: skip
    assert not (run_dir / "results.json").exists()


def test_slurm_launcher_config_composes():
    """hydra/launcher=slurm: one SLURM task per device, nodes from the trainer."""
    overrides = ["+experiment=retfound_green", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                 "trainer.num_nodes=2", "paths.output_dir=/tmp/x"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def test_ddp_run_with_the_probe_monitor_stops_early_on_every_rank(tmp_path, data_dir):
    """The README's DDP command with ``callbacks.probe_monitor`` on and patience 1: rank 0 probes after each
    epoch, every rank meets its collectives in the same order (rank 0's progress bar syncs the epoch's metrics
    first: this run aborted in gloo before), exit 0, one results.json with the probes and, when the AUROC did not
    rise, the cut schedule as a deviation on every rank (fewer images seen)."""
    run_dir = tmp_path / "run"
    proc = run_tiny(run_dir, data_dir, *DDP, "data.batch_size=4", "trainer.max_epochs=4",
                    "callbacks.probe_monitor.every_n_epochs=1", "callbacks.probe_monitor.k=5",
                    "callbacks.probe_monitor.early_stopping.patience=1")  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    watched = results["objective"]["probe_monitor"]
    epochs = [row["epoch"] for row in watched["history"]]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    assert (run_dir / "probe_monitor.csv").read_text().count("\n") == len(epochs) + 1
    if watched["stopped_early_at_epoch"]:  # the AUROC did not rise: the run was cut, and says so
        cut = {d["key"]: d for d in results["recipe"]["deviations"]}["trainer.max_epochs"]
        assert cut["used"] == watched["stopped_early_at_epoch"] < 4 and "probe_monitor" in cut["why"]
        assert results["compute"]["train_images_seen"] < 4 * results["data"]["pretrain_images"]
