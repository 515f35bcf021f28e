"""data.augment_on=device: the pre-training augmentations on the batch, after its transfer (greenlab/data/device_augment.py).

Under one seed the device path draws the workers' parameters (the v2 transforms' own, recorded here) and gives
their images within a stated tolerance; over 10,000 draws each transform's rate and range are the config's; the
embedded default and a fundus folder train with it through the README's command line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

from greenlab.data import device_augment
from greenlab.data.base import PixelBatch, collate_pixels
from greenlab.data.embedded import _draw_fundus
from greenlab.data.fundus import crop_field_of_view
from greenlab.data.transforms2d import PRETRAIN_TRANSFORMS, RandomSidePadding, finetune_transform
from tests.conftest import TINY_RUN, run_cli

SIZE = 96
DEVICE = (
    "cuda" if torch.cuda.is_available() else "cpu"
)  # the GPU check runs these on the GPU (benchmarks/gpu_check.py)
# Most a pixel may differ from the workers' PIL output, in grey levels, under one seed: bilinear, PIL's float
# sums in 22-bit fixed point vs float32 here (1); bicubic, Pillow 13 runs its two passes vertical-first for some
# sizes (the uint8 rounding and clipping between the passes then differ where the cubic overshoots)
TOLERANCE = {"retfound_green": 1, "none": 1, "spark": 10, "mae": 10}


@pytest.fixture(scope="module")
def photograph() -> np.ndarray:
    """A fixed fundus-like photograph, field of view cropped (237 x 237 uint8 RGB)."""
    image = _draw_fundus(np.random.default_rng(3), 288, 256, haemorrhages=1, exudates=1)
    return np.asarray(crop_field_of_view(image, max_side=1024))


def record_v2_parameters(monkeypatch) -> list[tuple]:
    """What the workers' v2 transforms draw, as they apply it: (name, parameters) in order."""
    seen: list[tuple] = []
    for cls, keys in ((v2.RandomHorizontalFlip, ()), (v2.RandomVerticalFlip, ()), (v2.RandomRotation, ("angle",)),
                      (v2.RandomResizedCrop, ("top", "left", "height", "width")),
                      (v2.ColorJitter, ("brightness_factor", "contrast_factor"))):  # fmt: skip
        original = cls.transform

        def spy(self, inpt, params, _original=original, _cls=cls, _keys=keys):
            seen.append((_cls.__name__, tuple(params[k] for k in _keys)))
            return _original(self, inpt, params)

        monkeypatch.setattr(cls, "transform", spy)
    original_pad = RandomSidePadding.draw_pad
    monkeypatch.setattr(
        RandomSidePadding,
        "draw_pad",
        lambda self, width: seen.append(("RandomSidePadding", (p := original_pad(self, width),))) or p,
    )
    return seen


def drawn_parameters(d: device_augment.Draw) -> list[tuple]:
    """The same record, from the device path's draw."""
    out = []
    if d.hflip:
        out.append(("RandomHorizontalFlip", ()))
    if d.vflip:
        out.append(("RandomVerticalFlip", ()))
    if d.pad:
        out.append(("RandomSidePadding", (d.pad,)))
    if d.angle:
        out.append(("RandomRotation", (d.angle,)))
    if d.brightness is not None:
        out.append(("ColorJitter", (d.brightness, d.contrast)))
    if d.rows.origin or d.columns.origin or d.rows.low != 0 or d.rows.high != d.height:
        box = (d.rows.origin, d.columns.origin, d.rows.high - d.rows.low, d.columns.high - d.columns.low)
        out.append(("RandomResizedCrop", box))
    if d.mirror:
        out.append(("RandomHorizontalFlip", ()))
    return out


@pytest.mark.parametrize("augmentation", sorted(PRETRAIN_TRANSFORMS))
def test_one_seed_gives_the_workers_geometry_and_pixels(augmentation, photograph, monkeypatch):
    """60 seeds each: crop boxes, flips, padding, angle and jitter factors equal the v2 transforms' (recorded as
    they apply them); the images within TOLERANCE grey levels, and equal on almost every pixel."""
    pipeline = PRETRAIN_TRANSFORMS[augmentation](SIZE, (0.5,) * 3, (0.5,) * 3)
    device_augment.check(pipeline)
    height, width = photograph.shape[:2]
    seen = record_v2_parameters(monkeypatch)
    worst, differing = 0, []
    for seed in range(60):
        seen.clear()
        torch.manual_seed(seed)
        workers = pipeline(Image.fromarray(photograph))
        recorded = list(seen)
        torch.manual_seed(seed)
        draw = device_augment.draw(pipeline, height, width)
        device = device_augment.augment(torch.from_numpy(photograph.copy())[None].to(DEVICE), [draw])[0].cpu()
        crops = [entry for entry in recorded if entry[0] == "RandomResizedCrop"]
        if crops:  # a RandomResizedCrop's box is the drawn box
            ((_, (top, left, h, w)),) = crops
            assert (draw.rows.origin, draw.columns.origin, draw.rows.high - draw.rows.low,
                    draw.columns.high - draw.columns.low) == (top, left, h, w)  # fmt: skip
        others = [entry for entry in recorded if entry[0] != "RandomResizedCrop"]
        assert others == [entry for entry in drawn_parameters(draw) if entry[0] != "RandomResizedCrop"], seed
        assert (
            device.shape == workers.shape == (3, SIZE, SIZE) and device.dtype == workers.dtype == torch.uint8
        )
        difference = (device.int() - workers.int()).abs()
        worst = max(worst, int(difference.max()))
        differing.append(float((difference > 0).float().mean()))
    assert worst <= TOLERANCE[augmentation], worst
    assert np.mean(differing) < 0.05, np.mean(differing)


def test_a_batch_of_mixed_sizes_is_each_image_alone(photograph):
    """Images of different sizes in one padded batch come out as each would alone (nothing leaks from the
    padding or the neighbours)."""
    pipeline = PRETRAIN_TRANSFORMS["retfound_green"](SIZE, (0.5,) * 3, (0.5,) * 3)
    images = [photograph.copy(), photograph[:150, :201].copy(), photograph[30:, 10:120].copy()]
    batch = collate_pixels([(torch.from_numpy(i), torch.zeros(1)) for i in images])
    assert batch.pixels.shape == (3, 237, 237, 3) and batch.sizes.tolist() == [
        [237, 237],
        [150, 201],
        [207, 110],
    ]
    torch.manual_seed(0)
    draws = [device_augment.draw(pipeline, h, w) for h, w in batch.sizes.tolist()]
    together = device_augment.augment(batch.pixels.to(DEVICE), draws).cpu()
    for image, draw, out in zip(images, draws, together):
        alone = device_augment.augment(torch.from_numpy(image)[None].to(DEVICE), [draw])[0].cpu()
        assert torch.equal(out, alone)


def test_ten_thousand_draws_match_the_config():
    """RETFound-Green's notebook (flip 0.5, vertical flip 0.05, side padding 0.1 of 33-150 px at 1024, rotation
    0.25 of +-12.5 deg, jitter 0.25 of brightness / contrast 0.67-1.33, one of three crops) and SparK's /
    MAE's crop scales: rates by chi-square, ranges by Kolmogorov-Smirnov (p > 0.001, a fixed seed)."""
    torch.manual_seed(1)
    pipeline = PRETRAIN_TRANSFORMS["retfound_green"](392, (0.5,) * 3, (0.5,) * 3)
    n, side = 10_000, 1024
    draws = [device_augment.draw(pipeline, side, side) for _ in range(n)]
    for rate, applied in ((0.5, [d.hflip for d in draws]), (0.05, [d.vflip for d in draws]),
                          (0.1, [d.pad > 0 for d in draws]), (0.25, [d.angle != 0 for d in draws]),
                          (0.25, [d.brightness is not None for d in draws])):  # fmt: skip
        hits = sum(applied)
        assert stats.chisquare([hits, n - hits], [rate * n, (1 - rate) * n]).pvalue > 1e-3, (rate, hits)
    kinds = [_crop_kind(d) for d in draws]
    counts = [kinds.count(k) for k in ("random_resized_crop", "resize_centre_crop", "resize")]
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    angles = [d.angle for d in draws if d.angle]
    assert stats.kstest(angles, stats.uniform(-12.5, 25).cdf).pvalue > 1e-3
    pads = [d.pad for d in draws if d.pad]  # round(U[33/1024, 150/1024] x 1024): 33..150 px, uniform
    assert min(pads) >= 33 and max(pads) <= 150
    assert stats.chisquare(np.bincount(pads, minlength=151)[34:150]).pvalue > 1e-3
    for factors in ([d.brightness for d in draws if d.brightness], [d.contrast for d in draws if d.contrast]):
        assert stats.kstest(factors, stats.uniform(0.67, 0.66).cdf).pvalue > 1e-3
    crops = [d for d, kind in zip(draws, kinds) if kind == "random_resized_crop"]
    areas = [
        (c.rows.high - c.rows.low) * (c.columns.high - c.columns.low) / (c.height * c.padded_width)
        for c in crops
    ]
    ratios = [(c.columns.high - c.columns.low) / (c.rows.high - c.rows.low) for c in crops]
    assert (
        0.69 <= min(areas)
        and max(areas) <= 1.0
        and 3 / 5 - 0.01 <= min(ratios)
        and max(ratios) <= 5 / 3 + 0.01
    )
    for name, low in (("spark", 0.67), ("mae", 0.2)):
        pipeline = PRETRAIN_TRANSFORMS[name](224, (0.5,) * 3, (0.5,) * 3)
        draws = [device_augment.draw(pipeline, side, side) for _ in range(n)]
        mirrored = sum(d.mirror for d in draws)
        assert stats.chisquare([mirrored, n - mirrored]).pvalue > 1e-3
        areas = [(d.rows.high - d.rows.low) * (d.columns.high - d.columns.low) / side**2 for d in draws]
        assert low - 0.01 <= min(areas) < low + 0.02 and max(areas) <= 1.0
        assert {d.filter for d in draws} == {"bicubic"}


def _crop_kind(d: device_augment.Draw) -> str:
    if d.rows.low or d.rows.high != d.height or d.columns.low or d.columns.high != d.padded_width:
        return "random_resized_crop"  # a crop's own window
    return "resize_centre_crop" if d.rows.offset or d.columns.offset else "resize"


def test_steps_the_device_cannot_run_are_refused_by_name():
    with pytest.raises(ValueError, match="runs RandomRotation with nearest interpolation"):
        device_augment.check(
            finetune_transform(64, (0.5,) * 3, (0.5,) * 3)
        )  # nn-MobileNet's: bicubic rotation
    with pytest.raises(ValueError, match="cannot run RandomErasing"):
        device_augment.check(v2.Compose([v2.Resize(8), v2.RandomErasing()]))
    with pytest.raises(ValueError, match="ColorJitter's brightness and contrast only"):
        device_augment.check(v2.Compose([v2.ColorJitter(hue=0.1), v2.Resize(8)]))
    with pytest.raises(ValueError, match="resizes to the input size"):
        device_augment.check(v2.Compose([v2.RandomHorizontalFlip()]))
    # an order it cannot run is refused at start-up, not on the first batch where both steps fire
    with pytest.raises(ValueError, match="flips after padding or rotation"):
        device_augment.check(
            v2.Compose(
                [v2.RandomApply([RandomSidePadding()], p=0.01), v2.RandomHorizontalFlip(), v2.Resize(8)]
            )
        )
    with pytest.raises(ValueError, match="black fill only"):
        device_augment.check(v2.Compose([v2.RandomRotation(10, fill=255), v2.Resize(8)]))


def test_augment_on_is_checked_and_auto_picks_workers_on_a_cpu(tmp_path):
    from greenlab.config import build

    with pytest.raises(ValueError, match="data.augment_on must be one of"):
        build("data/embedded_fundus", cache_dir=str(tmp_path), augment_on="gpu")
    dm = build("data/embedded_fundus", cache_dir=str(tmp_path), num_images=12, img_size=28, num_workers=0,
               batch_size=4, augment_on="device")  # fmt: skip
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, PixelBatch) and batch.pixels.dtype == torch.uint8 and batch.pixels.shape[-1] == 3
    images, labels = dm.on_after_batch_transfer(batch, 0)
    assert images.shape == (4, 3, 28, 28) and images.dtype == torch.float32 and labels.shape[0] == 4
    auto = build(
        "data/embedded_fundus",
        cache_dir=str(tmp_path),
        num_images=12,
        img_size=28,
        num_workers=0,
        batch_size=4,
    )
    auto.setup()
    images, _ = next(iter(auto.train_dataloader()))
    assert auto.augment_where == "workers" and images.shape == (4, 3, 28, 28)


def test_a_resumed_run_goes_on_with_the_draws_generator(tmp_path):
    """The device draws' generator is in the datamodule's checkpoint state: a datamodule given it draws what the
    interrupted one would have drawn next (and the global generator is left as it was)."""
    from greenlab.config import build

    def datamodule():
        dm = build("data/embedded_fundus", cache_dir=str(tmp_path), num_images=12, img_size=28, num_workers=0,
                   batch_size=4, augment_on="device")  # fmt: skip
        dm.setup()
        return dm

    first = datamodule()
    batch = next(iter(first.train_dataloader()))
    first.augment_on_device(batch)
    state = first.state_dict()
    global_before = torch.get_rng_state()
    expected = first.augment_on_device(batch)
    assert torch.equal(torch.get_rng_state(), global_before)
    resumed = datamodule()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.augment_on_device(batch), expected)


def test_each_rank_draws_its_own_stream(tmp_path):
    """Under DDP every rank starts from the run's seed: the device draws are seeded by (seed, rank), so two ranks
    augment the same stored batch differently, and one rank the same way twice."""
    from types import SimpleNamespace

    from greenlab.config import build

    outputs = []
    for rank in (0, 1, 0):
        dm = build("data/embedded_fundus", cache_dir=str(tmp_path), num_images=12, img_size=28, num_workers=0,
                   batch_size=4, augment_on="device")  # fmt: skip
        dm.setup()
        batch = next(iter(dm.train_dataloader()))
        dm.trainer = SimpleNamespace(global_rank=rank)  # what augment_on_device reads of a trainer
        outputs.append(dm.augment_on_device(batch))
    assert not torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize(("data", "where"), [("embedded", "device"), ("fundus_folder", "device")])
def test_the_main_command_trains_with_either_setting(data, where, tmp_path, data_dir, photograph):
    """The README's command with data.augment_on=device / workers, on the embedded default and on a folder of
    photographs: it trains (a finite loss) and results.json says where the augmentations ran (the embedded
    default and a folder with workers: every other run of the suite and the fundus_folder tutorial, auto on a
    CPU)."""
    extra = [f"data.augment_on={where}"]
    if data == "fundus_folder":
        folder = tmp_path / "photos"
        folder.mkdir()
        rows = ["image_id,bright"]
        for i in range(16):
            Image.fromarray(np.clip(photograph.astype(int) + 40 * (i % 2), 0, 255).astype(np.uint8)).save(
                folder / f"eye{i}.png"
            )
            rows.append(f"eye{i},{i % 2}")
        (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
        extra += ["data=fundus_folder", f"data.root={folder}", f"data.labels_csv={tmp_path / 'labels.csv'}",
                  "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=1", "data.held_out_fraction=0.5",
                  f"data.pixel_cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    tiny = [o for o in TINY_RUN if data == "embedded" or not o.startswith("data.num_images")]
    run_cli(
        "+experiment=retfound_green",
        *tiny,
        *extra,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["augment_on"]["ran_on"] == where
    assert np.isfinite(results["metrics"]["final_train_loss"])
