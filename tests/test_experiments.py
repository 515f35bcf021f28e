"""Every experiment file composes (at its own scale and at scale=paper) and runs end to end through
``python -m greenlab +experiment=...`` at tiny size (the whole runs of the others: tests/test_cli.py, test_must.py,
test_grid.py); the 3D self-supervision experiments on a MedMNIST 3D file."""

import json

import pytest
from hydra import compose, initialize_config_dir

from greenlab.config import CONFIG_DIR
from tests.conftest import TINY, run_cli, write_npz_3d

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("scale", [None, "paper"])
def test_experiment_config_composes(experiment, scale):
    overrides = [f"+experiment={experiment}", "paths.output_dir=/tmp/x"] + (
        [f"scale={scale}"] if scale else []
    )
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert cfg.name == experiment and (
        cfg.scale_name == scale if scale else cfg.scale_name in ("demo", "paper")
    )
    assert cfg.data.get("img_size", cfg.img_size) == cfg.img_size
    backbone = cfg.objective.get("backbone") or cfg.objective.image_encoder
    assert backbone.get("img_size", cfg.img_size) == cfg.img_size


# whole tiny runs elsewhere (main_run; test_must.py; grid: tests/test_grid.py's sweep); greenrfm_lite is greenrfm
# with the stem of backbone/resnet3d18 stem_kernel=4 (tests/test_label_supervised.py) and composes (test_config.py
# snapshots); token_reconstruction_vit_base / _large are retfound_green with another backbone config, the same run
# at tiny widths (they compose: test_experiment_config_composes)
RUN_IN_FULL = ("retfound_green", "greenrfm", "greenrfm_lite", "grid", "token_reconstruction_vit_base",
               "token_reconstruction_vit_large")  # fmt: skip


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e not in RUN_IN_FULL])
def test_experiment_runs_fast_dev_run(experiment, tmp_path, data_dir):
    write_npz_3d(tmp_path / "tiny3d.npz")
    overrides = [o.format(npz_3d=tmp_path / "tiny3d.npz") for o in TINY[experiment]]
    run_cli(f"+experiment={experiment}", *overrides, "trainer.fast_dev_run=true", f"paths.data_dir={data_dir}",
            f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert (tmp_path / "run" / "results.json").is_file()
    if experiment == "sparse_cnn_mae":  # k-fold fine-tuning: every labelled image scored once, by its fold
        from greenlab.analysis import recompute
        from greenlab.results.model import Results

        results = Results.from_folder(tmp_path / "run")
        (scored,) = results.predictions
        folds = results.metrics["finetune_folds"]
        assert len(set(scored.ids)) == len(scored.ids) == sum(f["n_test"] for f in folds)
        per_fold = {
            r["fold"]: r["auroc"] for r in recompute.recompute(tmp_path / "run") if r["fold"] != "all"
        }
        assert per_fold == pytest.approx({k: f["auroc"] for k, f in enumerate(folds)}, nan_ok=True)


ON_MEDMNIST_3D = {  # the experiment files' own data=medmnist command lines, at tiny size
    "spark_3d": [
        "data.volume_size=[32,32,32]",
        "backbone.stem_kernel=2",
    ],  # 2^3 mask cells at total stride 16
    "token_reconstruction_3d": [],
    "mae_3d": ["backbone.volume_size=[16,16,16]", "backbone.patch_size=8"],
}


@pytest.mark.parametrize("experiment", ON_MEDMNIST_3D)
def test_3d_self_supervision_runs_on_a_medmnist_3d_file(experiment, tmp_path):
    """``+experiment=<3D objective> data=medmnist data.path=... data.crop_size=null``, augmented, end to end."""
    write_npz_3d(tmp_path / "tiny3d.npz")
    tiny = [o for o in TINY[experiment] if not o.startswith(("data.num_volumes", "data.num_text_only"))]
    run_cli(f"+experiment={experiment}", "data=medmnist", f"data.path={tmp_path / 'tiny3d.npz'}", "data.crop_size=null",
            *tiny, *ON_MEDMNIST_3D[experiment], "data.batch_size=4", "trainer.fast_dev_run=true",
            f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    data = json.loads((tmp_path / "run" / "results.json").read_text())["data"]
    assert data["is_3d"] and data["volume_augmentation"]["flip_prob"] == 0.5
