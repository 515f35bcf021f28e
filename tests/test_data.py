import numpy as np
import pytest
import torch
from PIL import Image

from greenlab.config import build
from greenlab.data.embedded import generate
from greenlab.data.fundus import field_of_view_box
from greenlab.data.splits import held_out
from tests.conftest import shared_data


@pytest.mark.parametrize("split", ["training", "test"])
def test_fov_box_matches_drive_field_of_view_masks(split):
    drive = shared_data("drive", split)
    images = sorted((drive / "images").glob("*.tif"))
    assert len(images) == 20
    for path in images:
        image = np.asarray(Image.open(path).convert("RGB"))
        mask_path = next((drive / "mask").glob(f"{path.stem.split('_')[0]}_*mask.gif"))
        mask = np.asarray(Image.open(mask_path)) > 0
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = field_of_view_box(image, threshold=5, margin=0.0)
        expected = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
        # DRIVE's background is dark grey (8-13), not black: a fixed threshold of 5 was 24 px off here
        assert max(abs(a - b) for a, b in zip(box, expected)) <= 4, (path.name, box, expected)


def test_drive_folder_loads_cropped_square_images():
    drive = shared_data("drive")
    dm = build("data/fundus_folder", root=str(drive), img_size=56, num_workers=0)
    dm.setup()
    assert (
        len(dm.pretrain_set) == 40
    )  # 20 training + 20 test photographs (no labels: none held out); .gif masks are not images
    square = dm.load(drive / "training" / "images" / "21_training.tif")
    assert square.width == square.height and square.width < 584  # black border cropped
    image, labels = dm.pretrain_set[0]
    assert image.shape == (3, 56, 56) and labels.shape == (0,)


def write_images(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((40, 40, 3), 100 + i, np.uint8)).save(folder / f"img{i}.png")


def labelled_photos(tmp_path, **changes):
    """data/fundus_folder over tmp_path/photos with tmp_path/labels.csv, at 28 px."""
    return build("data/fundus_folder", root=str(tmp_path / "photos"), labels_csv=str(tmp_path / "labels.csv"),
                 img_size=28, num_workers=0, **changes)  # fmt: skip


def test_corrupt_image_is_an_error_naming_the_file(tmp_path):
    write_images(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dm = build("data/fundus_folder", root=str(tmp_path / "photos"), img_size=28, num_workers=0)
    with pytest.raises(ValueError, match="broken.jpg"):
        dm.setup()


def test_skip_bad_writes_the_skip_list(tmp_path):
    write_images(tmp_path / "photos")
    (tmp_path / "photos" / "broken.png").write_bytes(b"garbage")
    (tmp_path / "labels.csv").write_text("image_id,dr\nimg0,0\nimg1,1\nbroken,1\n")  # img2 has no row
    dm = labelled_photos(tmp_path, skip_bad=True, held_out_fraction=0.0, output_dir=str(tmp_path / "run"))
    dm.setup()
    assert len(dm.pretrain_set) == 2
    listed = (tmp_path / "run" / "skipped_inputs.csv").read_text()
    assert "broken.png" in listed and "unreadable" in listed
    assert "img2.png" in listed and "no row" in listed


def test_missing_label_row_is_an_error_naming_image_and_csv(tmp_path):
    write_images(tmp_path / "photos")
    (tmp_path / "labels.csv").write_text("image_id,dr\nimg0,0\nimg1,1\n")
    dm = labelled_photos(tmp_path)
    with pytest.raises(ValueError, match=r"img2\.png.*no row in .*labels\.csv"):
        dm.setup()


def test_text_labels_and_blank_cells(tmp_path):
    write_images(tmp_path / "photos", count=4)
    (tmp_path / "labels.csv").write_text(
        "image_id,quality,dr\nimg0,good,0\nimg1,bad,\nimg2,good,2\nimg3,bad,1\n"
    )
    with pytest.raises(
        ValueError, match=r"column 'quality', row 2: 'good' is not a class label.*label_types"
    ):
        labelled_photos(tmp_path, held_out_fraction=0.0).setup()  # text classes only when declared
    dm = labelled_photos(tmp_path, held_out_fraction=0.0, label_types={"quality": ["bad", "good"]})
    dm.setup()
    assert [(t.name, t.num_classes) for t in dm.tasks] == [("quality", 2), ("dr", 3)]
    labels = dm.pretrain_set.labels
    assert labels.tolist() == [[1, 0], [0, -1], [1, 2], [0, 1]]  # bad=0, good=1; blank = -1


def test_split_is_deterministic_and_by_id():
    ids = [f"image_{i}" for i in range(2000)]
    first = [held_out(i, 0.2, 42) for i in ids]
    assert first == [held_out(i, 0.2, 42) for i in reversed(ids)][::-1]
    assert 0.17 < sum(first) / len(ids) < 0.23


def test_embedded_default_is_deterministic_and_labelled(tmp_path):
    a = generate(tmp_path / "a", num_images=6)
    b = generate(tmp_path / "b", num_images=6)
    for name in ("fundus_0000.png", "fundus_0005.png"):
        assert np.array_equal(
            np.asarray(Image.open(a / "images" / name)), np.asarray(Image.open(b / "images" / name))
        )
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()
    corner = np.asarray(Image.open(a / "images" / "fundus_0000.png"))[:5, :5]
    assert corner.max() == 0  # black outside the field of view, like a real photograph


def write_npz(path, shape, classes=3, with_test=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        if split == "test" and not with_test:
            continue
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (n, 1))
    np.savez(path, **arrays)


def test_medmnist_2d_uses_test_split_when_present(tmp_path):
    write_npz(tmp_path / "x.npz", (28, 28, 3))
    dm = build("data/medmnist", path=str(tmp_path / "x.npz"), img_size=56, num_workers=0)
    dm.setup()
    assert dm.eval_split == "test" and len(dm.probe_test_set) == 8
    image, label = dm.probe_test_set[0]
    assert image.shape == (3, 56, 56) and label.shape == (1,)


def test_medmnist_falls_back_to_val_and_reads_3d(tmp_path):
    write_npz(tmp_path / "v.npz", (16, 16, 16), classes=2, with_test=False)
    dm = build("data/medmnist", path=str(tmp_path / "v.npz"), num_workers=0)
    dm.setup()
    assert dm.eval_split == "val" and dm.is_3d
    volume, _ = dm.probe_test_set[0]
    assert volume.shape == (1, 16, 16, 16) and 0.0 <= volume.min() and volume.max() <= 1.0


def test_medmnist_bad_file_errors_name_it(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.npz"):
        build("data/medmnist", path=str(tmp_path / "bad.npz")).setup()
    np.savez(tmp_path / "nolabels.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"nolabels.npz: missing key 'train_labels'"):
        build("data/medmnist", path=str(tmp_path / "nolabels.npz")).setup()


def test_real_retinamnist_file():
    path = shared_data("retinamnist", "retinamnist_28_trainval.npz")
    dm = build("data/medmnist", path=str(path), img_size=28, num_workers=0)
    dm.setup()
    assert dm.eval_split == "val" and len(dm.pretrain_set) == 1080 and len(dm.probe_test_set) == 120
    assert [(t.name, t.num_classes) for t in dm.tasks] == [("label", 5)]
    assert isinstance(dm.pretrain_set[0][0], torch.Tensor)


def test_uint8_percentile_equals_numpys():
    from greenlab.data.fundus import percentile

    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.integers(0, rng.integers(1, 257), rng.integers(1, 3000)).astype(np.uint8)
        for q in (0, 1, 50, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q), abs=1e-9)


def test_training_batches_are_normalised_on_the_device_bit_for_bit():
    from torchvision.transforms import v2

    from greenlab.data.transforms2d import normalise_batch

    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)) for _ in range(5)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    in_worker = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    expected = torch.stack([in_worker(p) for p in photos])
    uint8 = torch.stack([v2.ToImage()(p) for p in photos])
    assert torch.equal(normalise_batch(uint8, mean, std), expected)
    dm = build(
        "data/fundus_folder", root="unused", img_size=30, mean=list(mean), std=list(std), num_workers=0
    )
    labels = torch.zeros(5, 0)
    images, same_labels = dm.on_after_batch_transfer([uint8, labels], 0)
    assert torch.equal(images, expected) and same_labels is labels
    floats = [expected, labels]  # already float (volumes, evaluation): unchanged
    assert dm.on_after_batch_transfer(floats, 0)[0] is expected
