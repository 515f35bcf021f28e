"""End to end through ``python -m greenlab``, at tiny size, on the generated embedded default."""

import csv
import json

import numpy as np
import pytest
import timm
import torch

from greenlab.config import CONFIG_DIR
from tests.conftest import TINY_RUN, run_cli, run_tiny

# its module-scoped runs are made once: `make test` (pytest-xdist --dist loadgroup) keeps the file on one worker
pytestmark = pytest.mark.xdist_group("cli")

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
RESULT_KEYS = {
    "experiment": None,
    "init": ["used"],
    "metrics": ["probe_auroc_macro"],
    "compute": ["params", "train_flops", "device_hours", "peak_memory_bytes", "train_throughput_img_s"],
    "energy": ["kwh", "co2e_kg", "method"],
    "embedding": ["dim", "bytes_per_image", "throughput_img_s"],
}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_tiny(run_dir, data_dir)
    return run_dir, proc


def test_main_command_writes_complete_results(main_run):
    run_dir, proc = main_run
    assert str(run_dir / "results.json") in proc.stdout and str(run_dir / "results.md") in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    for section, keys in RESULT_KEYS.items():
        assert section in results, section
        for key in keys or []:
            assert key in results[section], f"{section}.{key}"
    assert results["experiment"] == "retfound_green" and results["scale"] == "demo"
    assert results["init"]["used"] == "random" and results["init"]["note"]  # offline: recorded, not hidden
    assert 0.0 <= results["metrics"]["probe_auroc_macro"] <= 1.0
    assert set(results["metrics"]["probe_tasks"]) == {"haemorrhages", "hard_exudates", "grade"}
    assert "probe_auroc_macro" in results["metrics"]["initial_backbone"]
    compute = results["compute"]
    assert (
        compute["compiled"] == []
        and compute["channels_last"] is False
        and compute["fused_optimizer"] is False
    )
    # 24 generated images, 80 % kept for pre-training (by id hash), 2 epochs
    assert compute["train_images_seen"] == 2 * results["data"]["pretrain_images"]
    assert compute["train_flops"] == pytest.approx(
        compute["train_flops_per_image"] * compute["train_images_seen"]
    )
    assert (
        compute["train_flops_per_image"] > 1e6
        and compute["device_hours"] > 0
        and compute["peak_memory_bytes"] > 1e7
    )
    assert results["energy"]["kwh"] > 0 and results["energy"]["co2e_kg"] > 0
    assert results["embedding"]["dim"] == 48 and results["embedding"]["bytes_per_image"] == 48 * 4
    assert "Linear probes" in (run_dir / "results.md").read_text()


def test_predictions_reproduce_the_reported_aurocs_and_calibration(main_run, tmp_path):
    """predictions.csv (one row per held-out case and task) gives back each probe's point AUROC exactly, and the
    calibration results.json reports; ``greenlab.compare --recompute`` writes the same."""
    from greenlab.analysis import recompute
    from greenlab.analysis.compare import main as compare
    from greenlab.results.model import MACRO, Results

    run_dir, _ = main_run
    results = Results.from_folder(run_dir)
    reported = {c.task: c.auroc_point for c in results.comparisons if c.comparison == MACRO}
    rows = recompute.recompute(run_dir)
    assert {r["task"]: r["auroc"] for r in rows} == reported and len(reported) == 3
    for row in rows:
        record = results.metrics["calibration"][f"linear_probe/{row['dataset']}/{row['task']}"]
        assert (row["ece_width"], row["ece_mass"], row["brier"]) == pytest.approx(
            (record["ece_width"], record["ece_mass"], record["brier"])
        )
    assert sorted(p.name for p in (run_dir / "calibration").glob("*.png")) == [
        f"linear_probe_embedded_fundus_{t}.png" for t in ("grade", "haemorrhages", "hard_exudates")
    ]
    assert "## Calibration" in (run_dir / "results.md").read_text()
    projected = results.metrics["probe_embedding_map"]  # PCA of the held-out embeddings, coloured per task
    assert projected["method"] == "pca" and len(projected["xy"]) == len(
        results.held_out["embedded_fundus"].ids
    )
    assert set(projected["labels"]) == set(reported) and (run_dir / "embedding_map.png").is_file()
    assert "probe_embedding_map" not in results.metrics["initial_backbone"]
    assert compare(["--recompute", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "recomputed.csv").read_text().count("linear_probe") == 3


def test_student_weights_saved_alone_and_timm_loadable(main_run):
    run_dir, _ = main_run
    state = torch.load(run_dir / "backbone.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("teacher", "student", "head", "corruption")) for k in state)
    recipe = json.loads((run_dir / "backbone.json").read_text())
    model = timm.create_model(
        recipe["model_name"], img_size=recipe["img_size"], num_classes=0, **recipe["model_kwargs"]
    )
    model.load_state_dict(state)  # strict
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"]), "the teacher is never saved"


def test_evaluate_only_gives_the_training_runs_probe_numbers(main_run, data_dir, tmp_path):
    """python -m greenlab.evaluate on the run's backbone.pth = the evaluation inside the training run."""
    run_dir, _ = main_run
    tiny = [o for o in TINY_RUN if not o.startswith(("trainer.", "data.batch_size"))]
    # the run scored with RETFound-Green's official preprocessing (experiment/retfound_green.yaml): say so here too
    run_cli(*tiny, f"backbone.weights={run_dir / 'backbone.pth'}", f"paths.data_dir={data_dir}", "compute.region=FRA",
            "evaluation.preprocessing=official", f"hydra.run.dir={tmp_path / 'eval'}", module="greenlab.evaluate")  # fmt: skip
    trained, evaluated = (json.loads((d / "results.json").read_text()) for d in (run_dir, tmp_path / "eval"))
    assert evaluated["init"]["used"] == "file" and evaluated["objective"] is None
    assert (
        evaluated["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and evaluated["preprocessing"]["img_size"] == 28
    )
    for name, task in trained["metrics"]["probe_tasks"].items():
        again = evaluated["metrics"]["probe_tasks"][name]
        for key in ("auroc", "auroc_point", "auprc", "balanced_accuracy"):
            assert again[key] == pytest.approx(task[key], abs=1e-6), (name, key)
    with np.load(run_dir / "bootstrap.npz") as a, np.load(tmp_path / "eval" / "bootstrap.npz") as b:
        assert a.files == b.files and all(np.allclose(a[k], b[k], atol=1e-6, equal_nan=True) for k in a.files
                                          if not k.endswith("/ids"))  # fmt: skip
    assert "evaluation only" in (tmp_path / "eval" / "results.md").read_text()
    energy = evaluated["energy"]  # France's grid from the shipped table: 0.056039 kg/kWh (2023)
    assert (
        energy["carbon_intensity_kg_per_kwh"] == 0.056039
        and "France (FRA) 2023" in energy["carbon_intensity_source"]
    )
    assert energy["co2e_kg"] == pytest.approx(energy["kwh"] * energy["pue"] * 0.056039, rel=1e-12)


def test_exported_timm_folder_gives_the_embeddings_of_backbone_pth(main_run):
    """backbone_hf/ loads with timm.create_model("local-dir:...") alone, with the data's preprocessing."""
    run_dir, _ = main_run
    config = json.loads((run_dir / "backbone_hf" / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and config["pretrained_cfg"]["input_size"] == [
        3,
        28,
        28,
    ]
    assert config["greenlab_preprocessing"]["field_of_view_crop"]["threshold"] == 5
    from_folder = timm.create_model(f"local-dir:{run_dir / 'backbone_hf'}", pretrained=True).eval()
    recipe = json.loads((run_dir / "backbone.json").read_text())
    from_pth = timm.create_model(recipe["model_name"], img_size=recipe["img_size"], num_classes=0,
                                 **recipe["model_kwargs"]).eval()  # fmt: skip
    from_pth.load_state_dict(torch.load(run_dir / "backbone.pth", weights_only=True))
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(from_folder.forward_features(images), from_pth.forward_features(images))


def test_metrics_logged_to_csv_and_wandb_offline(main_run):
    run_dir, _ = main_run
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        columns = next(csv.reader(handle))
    for column in (
        "train/loss_step",
        "compute/train_flops",
        "compute/throughput_img_s",
        "energy/kwh",
        "final/probe_auroc_macro",
    ):
        assert column in columns, column
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("run-*.wandb")), "a W&B run file that `wandb sync` can upload"


def test_rerun_into_same_directory_never_overwrites(main_run, data_dir):
    """Refused before Hydra writes anything: the finished run's files, its .hydra record included, stay."""
    run_dir, _ = main_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    proc = run_tiny(run_dir, data_dir, check=False)
    assert proc.returncode != 0 and "already holds a finished run" in proc.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert [p for p in run_dir.rglob("*") if p.is_file()] == files


def test_checkpoints_without_last_ckpt_are_left_alone(tmp_path, data_dir):
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch000.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"an earlier run's checkpoint")
    proc = run_tiny(tmp_path / "run", data_dir, check=False)
    assert proc.returncode != 0 and "no last.ckpt to resume from" in proc.stderr
    assert checkpoint.read_bytes() == b"an earlier run's checkpoint"


def test_killed_run_resumes_from_its_last_checkpoint(main_run, tmp_path, data_dir):
    """Kill -9 mid-epoch, run the same command into the same folder: it continues from last.ckpt, makes
    the same number of optimizer steps as an uninterrupted run (the main run, same config), and keeps every
    earlier checkpoint."""
    whole = json.loads((main_run[0] / "results.json").read_text())["compute"]
    total = whole["optimizer_steps"]
    run = tmp_path / "run"
    killed = run_tiny(run, data_dir, "+callbacks.kill._target_=tests.helpers.KillAtStep",
                      f"+callbacks.kill.step={total - 1}", check=False)  # fmt: skip
    assert killed.returncode != 0 and not (run / "results.json").exists()
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("epoch*.ckpt")}
    assert "epoch000.ckpt" in before
    run_tiny(run, data_dir, "resume.allow_config_change=true")  # without the kill callback: a recorded change
    changes = json.loads((run / ".hydra" / "attempt-1" / "resume_changes.json").read_text())
    assert set(changes) == {"callbacks.kill._target_", "callbacks.kill.step"}
    results = json.loads((run / "results.json").read_text())
    assert results["compute"]["optimizer_steps"] == total and results["compute"]["resumed_attempts"] == 1
    assert results["compute"]["train_images_seen"] == whole["train_images_seen"]
    for name, content in before.items():
        assert (run / "checkpoints" / name).read_bytes() == content, name
    assert (run / "checkpoints" / "resumed-from-1.ckpt").is_file()
    assert (run / "csv" / "metrics.attempt-1.csv").is_file() and (run / "csv" / "metrics.csv").is_file()
    # one W&B run: both attempts wrote offline-run-<time>-<id> folders of the id kept in the run folder
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and {a.name.rsplit("-", 1)[1] for a in attempts} == {run_id}


def test_multirun_gives_separate_runs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_cli(
        "-m",
        "+experiment=retfound_green",
        *TINY_RUN,
        "trainer.max_epochs=1",
        "evaluate_initial_backbone=false",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
        "objective.noise_std=0.1,0.3",
    )
    configs = [json.loads((sweep / str(i) / "results.json").read_text())["config"] for i in (0, 1)]
    assert [c["objective"]["noise_std"] for c in configs] == [0.1, 0.3]
    groups = {c["logger"]["wandb"]["group"] for c in configs}  # one W&B group for the whole sweep
    assert groups == {"retfound_green-sweep-sweep"}
    wandb_runs = [next((sweep / str(i) / "wandb").glob("offline-run-*")).name.split("-")[-1] for i in (0, 1)]
    assert wandb_runs[0] != wandb_runs[1]


def test_same_seed_same_config_same_results(main_run, tmp_path, data_dir):
    """Determinism on CPU: a second run of the main run's config gives the same loss and probe metrics."""
    run_tiny(tmp_path / "again", data_dir)
    results = [json.loads((d / "results.json").read_text()) for d in (main_run[0], tmp_path / "again")]
    assert results[0]["metrics"]["final_train_loss"] == results[1]["metrics"]["final_train_loss"]
    assert results[0]["metrics"]["probe_tasks"] == results[1]["metrics"]["probe_tasks"]
