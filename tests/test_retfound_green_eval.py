"""RETFound-Green's evaluation as its official code (issue #27): the inference notebooks' preprocessing
(``evaluation.preprocessing=official``), the training augmentation's 1.3x resize, and the bootstrap of
``get_bootstrap_aucs`` (Training_and_eval_code/evaluation/Eval_*.ipynb)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision.io import read_image
from torchvision.transforms import v2 as T

from greenlab.config import CONFIG_DIR, build
from greenlab.data.embedded import generate
from greenlab.data.fundus import crop_field_of_view
from greenlab.data.transforms2d import eval_transform, official_eval_transform, retfound_green_transform
from greenlab.evaluation import statistics
from tests.conftest import TINY_VIT, shared_data

HALF = (0.5, 0.5, 0.5)
# Ours_IDRID_Inference.ipynb / Ours_ROP_Inference.ipynb, cell 0 (the image read with torchvision.io.read_image)
NOTEBOOK = T.Compose([T.Resize((392, 392), antialias=True), T.ToDtype(torch.float32, scale=True),
                      T.Normalize((0.5,), (0.5,))])  # fmt: skip


def get_bootstrap_aucs(y_true, y_pred, bootstrap_iters=100):
    """Eval_IDRiD.ipynb (and Eval_ROP, Eval_BRSET, ...), verbatim."""
    rng = np.random.RandomState(seed=42)
    idxs = list(range(y_pred.shape[0]))

    bootstrap_aucs = []
    for _ in range(bootstrap_iters):
        curr_idxs = rng.choice(idxs, size=len(idxs), replace=True)
        bootstrap_aucs.append(
            roc_auc_score(y_true[curr_idxs], y_pred[curr_idxs], multi_class="ovr", average="macro")
        )

    return np.median(bootstrap_aucs), bootstrap_aucs


def photographs(tmp_path, count: int = 6):
    """``count`` generated fundus photographs (288 x 256: not square, a black border), alternately JPEG
    (quality 90) and PNG, in tmp_path/photos, with a binary label each in tmp_path/labels.csv."""
    source = generate(tmp_path / "generated", num_images=count)
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for i, path in enumerate(sorted((source / "images").glob("*.png"))):
        name = f"photo{i}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.open(path).convert("RGB").save(photos / name, **({"quality": 90} if i % 2 == 0 else {}))
        rows.append((f"photo{i}", i % 2))
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("image_id", "label"), *rows])
    return photos


def test_official_preprocessing_equals_the_inference_notebooks_torchvision_pipeline(tmp_path):
    photos = photographs(tmp_path)
    dm = build("data/fundus_folder", root=str(photos), labels_csv=str(tmp_path / "labels.csv"), img_size=392,
               num_workers=0, pixel_cache_dir=None, held_out_fraction=0.5)  # fmt: skip
    dm.setup()
    held_out = [photos / next(p.name for p in photos.iterdir() if p.stem == i) for i in dm.held_out_ids()]
    greenlab = [dm.probe_test_set[k][0] for k in range(len(held_out))]
    dm.use_probe_preprocessing("official")
    for k, path in enumerate(held_out):  # JPEG and PNG: PIL's decode equals read_image's here, bit for bit
        official = dm.probe_test_set[k][0]
        assert torch.equal(official, NOTEBOOK(read_image(str(path)))), path.name
        # greenlab's: the field-of-view crop, padded square, then the resize: another tensor
        cropped = crop_field_of_view(Image.open(path).convert("RGB"))
        assert torch.equal(greenlab[k], eval_transform(392, HALF, HALF)(cropped))
        assert (greenlab[k] - official).abs().max() > 0.1
    assert dm.describe()["preprocessing"]["probe_sets"] == "official"
    with pytest.raises(ValueError, match="official"):
        dm.use_probe_preprocessing("crop")


def test_official_preprocessing_of_a_real_drive_photograph(tmp_path):
    tif = shared_data("drive", "training", "images", "21_training.tif")
    png = tmp_path / "21_training.png"  # read_image reads no TIFF: the same pixels, losslessly
    Image.open(tif).convert("RGB").save(png)
    dm = build("data/fundus_folder", root=str(tmp_path), img_size=392, num_workers=0, pixel_cache_dir=None)
    assert torch.equal(
        official_eval_transform(392, HALF, HALF)(dm.decode(png)), NOTEBOOK(read_image(str(png)))
    )
    assert NOTEBOOK(read_image(str(png))).shape == (3, 392, 392)  # 565 x 584 squashed, not cropped


def test_the_training_resize_then_crop_branch_is_int_1_3_x_392():
    """data.py ``T.Compose([T.Resize(int(res * 1.3), antialias=True), T.CenterCrop(res)])``: 509 px at 392."""
    augment = retfound_green_transform(392, HALF, HALF)
    choice = next(t for t in augment.transforms if isinstance(t, T.RandomChoice))
    resize, crop = choice.transforms[1].transforms
    assert resize.size == [509] and crop.size == (392, 392)


def test_bootstrap_indices_are_the_official_resamples():
    idxs = list(range(37))
    rng = np.random.RandomState(42)  # get_bootstrap_aucs: one fresh RandomState per call, then 100 draws
    official = np.stack([rng.choice(idxs, size=len(idxs), replace=True) for _ in range(100)])
    assert np.array_equal(statistics.resample_indices(37, 100, 42), official)
    # the 1,000 of the 95 % interval continue the same stream: their first 100 are the official ones
    assert np.array_equal(statistics.resample_indices(37, 1000, 42)[:100], official)
    assert statistics.resample_indices(37, 0, 42).shape == (0, 37)


def test_bootstrap_medians_equal_the_official_code_on_the_same_predictions():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, 120), rng.integers(0, 3, 60)
    signal = lambda y: rng.normal(0, 1, (len(y), 8)) + 0.8 * np.eye(3)[y] @ rng.normal(0, 1, (3, 8))  # noqa: E731
    x_train, x_test = signal(y_train), signal(y_test)
    record, draws, _ = build("evaluation/linear_probe").probe_task(x_train, y_train, x_test, y_test)
    # the official probe and its one-vs-rest calls (Eval_IDRiD.ipynb: y_test == grade, preds[:, grade])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=20_000, random_state=42))
    preds = clf.fit(x_train, y_train).predict_proba(x_test)
    for grade in range(3):
        median, aucs = get_bootstrap_aucs(y_test == grade, preds[:, grade])
        assert record["per_class"][str(grade)]["auroc"] == pytest.approx(median, abs=1e-12)
        np.testing.assert_allclose(draws[str(grade)], aucs, atol=1e-6)  # saved as float32
    # the multi-class call (multi_class="ovr", average="macro") is greenlab's macro on every resample
    median, _ = get_bootstrap_aucs(y_test, preds)
    assert record["auroc"] == pytest.approx(median, abs=1e-12)


def test_the_probe_gives_the_data_its_preprocessing_and_records_it(tmp_path):
    photos = photographs(tmp_path, count=8)
    dm = build("data/fundus_folder", root=str(photos), labels_csv=str(tmp_path / "labels.csv"), img_size=28,
               num_workers=0, pixel_cache_dir=None, held_out_fraction=0.5)  # fmt: skip
    vit = build("backbone/vit_small_reg4_dinov2", img_size=28, weights="random", model_kwargs=TINY_VIT)
    probe = build("evaluation/linear_probe", preprocessing="official", bootstrap_resamples=5, ci_resamples=5)
    metrics = probe(vit, dm, torch.device("cpu")).metrics
    assert dm.probe_preprocessing == "official" and metrics["probe_preprocessing"] == {"photos": "official"}
    with pytest.raises(ValueError, match="official or greenlab"):
        build("evaluation/linear_probe", preprocessing="crop")


def test_retfound_green_composes_the_official_evaluation_and_clipping():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=retfound_green", "scale=paper"])
        base = compose("config", overrides=["+experiment=token_reconstruction_vit_base", "scale=paper"])
    for composed in (cfg, base):
        assert composed.evaluation.preprocessing == "official" and composed.objective.clip == "official"
        assert composed.trainer.gradient_clip_val == 0.1
