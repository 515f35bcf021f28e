"""The contracts (greenlab/contracts.py): a method added from outside the package runs through the pipeline,
and a datamodule that lacks what a part needs is refused at start-up, naming both."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import get_object

from greenlab import contracts
from tests.conftest import REPO, TINY_DATA, run_cli

TOY_CONF = REPO / "tests" / "toy_method" / "conf"  # YAML of a toy method, reached through Hydra's search path
TOY = [f"hydra.searchpath=[file://{TOY_CONF}]", "+experiment=toy", *TINY_DATA]


def test_a_method_added_from_the_tests_folder_runs_end_to_end(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_cli(*TOY, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["experiment"] == "toy" and results["objective"] == {"toy": "mean colour regression"}
    assert results["recipe"]["experiment"] == "toy"  # its own file is its recipe (it has no scale)
    assert {d["key"] for d in results["recipe"]["deviations"]} >= {"data.num_images", "effective_batch_size"}
    accuracy = results["metrics"]["centroid_accuracy"]
    assert set(accuracy) == {"haemorrhages", "hard_exudates", "grade"} and all(
        0 <= v <= 1 for v in accuracy.values()
    )
    assert results["optimized_metric"] == "centroid_accuracy_macro"
    assert (
        "centroid_accuracy_macro" in results["metrics"]["initial_backbone"]
    )  # the before-pre-training control
    assert results["init"]["used"] == "random" and results["embedding"]["dim"] == 8
    assert "## Nearest-centroid accuracy" in (run_dir / "results.md").read_text()
    recipe = json.loads((run_dir / "backbone.json").read_text())  # the export: how to rebuild the backbone
    assert recipe["factory"] == "tests.toy_method.toy.PatchCNN" and recipe["weights"] == str(
        run_dir / "backbone.pth"
    )
    model = get_object(recipe["factory"])(width=recipe["width"])
    model.load_state_dict(torch.load(recipe["weights"], weights_only=True))  # strict


def test_a_datamodule_without_what_the_evaluation_needs_is_refused_at_start_up(tmp_path, data_dir):
    proc = run_cli(*TOY, "evaluation=zero_shot", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}",
                   check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "evaluation ZeroShot needs a datamodule that is a ReportsSource" in proc.stderr
    assert "EmbeddedFundusDataModule has no test_reports, train_reports" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists(), "refused before any training"


def test_check_requirements_names_the_missing_members():
    class Evaluation:
        requires = (contracts.ReportsSource,)

    class Reports:
        train_reports, test_reports = ["a"], ["b"]

    contracts.check_requirements(Evaluation(), "evaluation", Reports())
    with pytest.raises(TypeError, match="object has no test_reports, train_reports"):
        contracts.check_requirements(Evaluation(), "evaluation", object())


TINY_VIT_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def test_the_command_refuses_an_unfit_pair_in_one_line_and_a_sweep_skips_it(tmp_path, data_dir):
    """Before any training; in a -m sweep the fitting pair runs and the refused one is one line."""
    tiny = ["backbone.weights=random", "img_size=28", *(f"+backbone.model_kwargs.{k}={v}" for k, v in TINY_VIT_KWARGS.items()),
            "data.num_images=24", "data.num_workers=0", f"paths.data_dir={data_dir}"]  # fmt: skip
    proc = run_cli("+experiment=retfound_green", "objective=spark", *tiny, f"hydra.run.dir={tmp_path / 'one'}",
                   check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (f"greenlab: objective spark needs {contracts.CAPABILITIES['hierarchy']}; backbone vit_small_reg4_dinov2 is "
            "a 2D token sequence") in proc.stderr  # fmt: skip
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "+experiment=retfound_green", "objective=token_reconstruction,spark", *tiny,
                   "trainer.fast_dev_run=true", "evaluation.bootstrap_resamples=10", "evaluation.ci_resamples=10",
                   f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert (sweep / "0" / "results.json").is_file() and not (sweep / "1" / "results.json").exists()
    assert (
        proc.stderr.count("greenlab: refused (this job of the sweep is skipped): objective spark needs") == 1
    )
