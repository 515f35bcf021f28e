"""Shared fixtures: tiny models, the real sample data beside the checkout, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# One torch thread per test process and per command it runs: `make test` runs 2 pytest-xdist workers on 2 cores,
# and tiny models gain nothing from a second thread (measured: the fast_dev_run tests 108 -> 91 s)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A ViT small enough for CPU tests: same timm architecture (registers, LayerScale), 2 blocks of 48 dims.
TINY_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 2}
TINY_DATA = [
    "data.num_images=24",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
]
TINY_RUN = [  # retfound_green
    "img_size=28",
    "+backbone.model_kwargs.embed_dim=48",
    "+backbone.model_kwargs.depth=2",
    "+backbone.model_kwargs.num_heads=2",
    *TINY_DATA,
    "evaluation.bootstrap_resamples=10",
    "evaluation.ci_resamples=10",
]
TINY_SPARSE_CNN = [  # sparse_cnn_mae: ReXNet width 1.0, 64 px (a 2x2 mask grid), 2 folds of 1 epoch
    "img_size=64",
    "backbone.model_name=rexnet_100",
    "objective.decoder_width=32",
    *TINY_DATA,
    "evaluation.folds=2",
    "evaluation.epochs=1",
    "evaluation.batch_size=8",
    "evaluation.num_workers=0",
]
TINY_MAE = [  # mae_baseline: a 2-block ViT/16 at 32 px (4 patches, 1 visible), a 1-block decoder
    "img_size=32",
    "+backbone.model_kwargs.embed_dim=48",
    "+backbone.model_kwargs.depth=2",
    "+backbone.model_kwargs.num_heads=2",
    "objective.decoder_dim=32",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    *TINY_DATA,
    "evaluation.bootstrap_resamples=10",
    "evaluation.ci_resamples=10",
]
TINY_3D = [  # greenrfm_stage1_medmnist3d: ResNet-10 on 16^3 volumes, {npz_3d} is filled in by the test
    "data.path={npz_3d}",
    "backbone.depth=10",
    "channels_last=true",  # the 3D layout (NDHWC weights) end to end, the trained and the initial encoder
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "evaluation.bootstrap_resamples=10",
    "evaluation.ci_resamples=10",
]
TINY_GREENRFM = [  # greenrfm(_lite): 24 generated studies at 20 x 20 x 30 mm, ResNet-10, a 1-layer BERT
    "data.num_volumes=24",
    "data.num_text_only_reports=40",
    "data.spacing=[20,20,30]",
    "data.pad_size=[16,16,10]",
    "data.crop_size=[16,16,8]",
    "data.batch_size=6",
    "data.eval_batch_size=6",
    "data.num_workers=0",
    "backbone.depth=10",
    "text_encoder.vocab_size=200",
    "text_encoder.hidden_size=32",
    "text_encoder.num_layers=1",
    "text_encoder.num_heads=2",
    "objective.latent_dim=16",
    "objective.stage1_epochs=1",
    "trainer.max_epochs=2",
    "evaluation.linear_probe.bootstrap_resamples=10",
    "evaluation.linear_probe.ci_resamples=10",
]
TINY_SPARK_RESNET = [  # spark_resnet50: ResNet-50's blocks, one per stage, narrow; 64 px
    "+backbone.model_kwargs.layers=[1,1,1,1]",
    "+backbone.model_kwargs.channels=[8,16,32,64]",
    "objective.decoder_width=32",
    *TINY_DATA,
    "evaluation.bootstrap_resamples=10",
    "evaluation.ci_resamples=10",
]
TINY_SSL_3D = [  # spark_3d, token_reconstruction_3d: ResNet-10 (lite stem) on 24 embedded CT studies, 64x64x32
    "data.num_volumes=24",
    "data.num_text_only_reports=40",
    "data.num_workers=0",
    "backbone.depth=10",
    "backbone.weights=random",
    "evaluation.bootstrap_resamples=10",
    "evaluation.ci_resamples=10",
]
TINY_MAE_3D = [  # mae_3d: a 1-block 3D ViT of 48 dims, a 1-block decoder, on 24 embedded CT studies
    "data.num_volumes=24",
    "data.num_text_only_reports=40",
    "data.num_workers=0",
    "backbone.depth=1",
    "backbone.embed_dim=48",
    "backbone.num_heads=2",
    "objective.decoder_dim=48",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "evaluation.bootstrap_resamples=10",
    "evaluation.ci_resamples=10",
]
TINY = {
    "retfound_green": TINY_RUN,
    "mae_3d": TINY_MAE_3D,
    "spark_3d": TINY_SSL_3D,
    "token_reconstruction_3d": TINY_SSL_3D,
    "spark_resnet50": TINY_SPARK_RESNET,
    "sparse_cnn_mae": TINY_SPARSE_CNN,
    "mae_baseline": TINY_MAE,
    "greenrfm_stage1_medmnist3d": TINY_3D,
    "greenrfm": TINY_GREENRFM,
    "greenrfm_lite": TINY_GREENRFM,
}


def write_tiny_npz(path, spatial: tuple[int, ...], counts: tuple[int, int] = (12, 8)) -> None:
    """A tiny MedMNIST-like file, 2D or 3D, (train, val) counts: a bright square / cube = class 1."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val"), counts):
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, (n, *spatial), dtype=np.uint8)
        images[(labels == 1, *(slice(4, 12) for _ in spatial))] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)


def write_npz_3d(path, size: int = 16) -> None:
    write_tiny_npz(path, (size, size, size))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"real sample data not found at {path} (../shared/data is only beside developer checkouts and CI)"
        )
    return path


def run_cli(
    *args: str, cwd: Path = REPO, check: bool = True, module: str = "greenlab"
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` (greenlab, greenlab.evaluate, ...) in a subprocess, offline; output captured."""
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def run_tiny(run_dir, data_dir, *extra, check=True):
    """The main command at tiny size into ``run_dir``."""
    return run_cli(
        "+experiment=retfound_green",
        *TINY_RUN,
        *extra,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        check=check,
    )


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One cache of generated embedded data for the whole session."""
    return tmp_path_factory.mktemp("greenlab_data")
