"""greenlab as a package: a wheel installed outside the checkout runs, a user's config folder is found, an
Optuna sweep ends with a best value, and SparK without MinkowskiEngine says what to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import greenlab.sparse
from greenlab.config import build
from tests.conftest import REPO, TINY_RUN, run_cli

USER_EXPERIMENT = """# @package _global_
defaults:
  - override /backbone: vit_small_reg4_dinov2
  - override /objective: token_reconstruction
  - override /data: embedded_fundus
  - override /evaluation: linear_probe

name: my_experiment
trainer:
  max_epochs: 1
"""


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs_with_a_user_config_folder(tmp_path, data_dir):
    wheels, site, work, source = (tmp_path / n for n in ("wheels", "site", "elsewhere", "source"))
    top_level = {
        ".git",
        "build",
        "logs",
        "data",
        "wandb",
        "outputs",
        "multirun",
    }  # run output, not the package

    def left_out(folder, names):
        here = set(names) & top_level if Path(folder) == REPO else set()
        return here | {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, source, ignore=left_out)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = wheels.glob("greenlab_fm-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    (work / "my_conf" / "experiment").mkdir(parents=True)
    (work / "my_conf" / "experiment" / "my_experiment.yaml").write_text(USER_EXPERIMENT)
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    tiny = [o for o in TINY_RUN if not o.startswith("trainer.")]
    common = [*tiny, f"paths.data_dir={data_dir}", "logger=csv"]

    def greenlab(*args):  # the console script the wheel installed, run outside the checkout
        proc = subprocess.run([str(site / "bin" / "greenlab"), *args, *common], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    where = subprocess.run([sys.executable, "-c", "import greenlab.config as c; print(c.CONFIG_DIR)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert where.startswith(str(site))  # the installed copy, configs included, not the checkout's
    greenlab("+experiment=retfound_green", "trainer.fast_dev_run=true", f"hydra.run.dir={work / 'fast'}")
    user = work / "user"
    greenlab(
        f"hydra.searchpath=[file://{work / 'my_conf'}]", "+experiment=my_experiment", f"hydra.run.dir={user}"
    )
    assert json.loads((user / "results.json").read_text())["experiment"] == "my_experiment"


@pytest.mark.slow
def test_optuna_sweep_of_three_trials_ends_with_a_best_value(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    run_cli("+experiment=retfound_green", "+hparams_search=retfound_green_optuna", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=3", *TINY_RUN, "trainer.max_epochs=1", "logger=csv",
            "evaluate_initial_backbone=false", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}")  # fmt: skip
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [
        json.loads((sweep / str(n) / "results.json").read_text())["metrics"]["probe_auroc_macro"]
        for n in range(3)
    ]
    assert best["best_value"] == pytest.approx(max(values))
    assert set(best["best_params"]) == {"objective.lr", "objective.max_corruption_ratio"}


def test_spark_without_minkowski_falls_back_or_names_the_install(monkeypatch):
    monkeypatch.setattr(
        greenlab.sparse, "minkowski_missing", lambda: "MinkowskiEngine does not import (test)"
    )
    monkeypatch.setattr(greenlab.sparse, "fastest_backend", lambda device: ("minkowski", "measured faster"))
    backbone = build("backbone/nn_mobilenet", model_name="rexnet_100")
    spark = build("objective/spark", backbone=backbone, sparse_backend="auto", decoder_width=32)
    assert spark.run_notes()["sparse_backend"] == "masked_dense"
    assert "does not import" in spark.run_notes()["sparse_backend_reason"]
    with pytest.raises(RuntimeError, match="sparse_backend=minkowski.*make install"):
        build("objective/spark", backbone=build("backbone/nn_mobilenet", model_name="rexnet_100"),
              sparse_backend="minkowski", decoder_width=32)  # fmt: skip
