"""The preprocessing cache of photograph folders: same pixels as decoding, only edited files re-processed,
corrupt entries rebuilt, concurrent writers safe."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
from PIL import Image

from greenlab.config import build
from greenlab.data.cache import HEADER


def write_photos(folder, count):
    """Fundus-like photographs: a bright disc on black, each a little different."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :150]
    for i in range(count):
        disc = ((yy - 60) ** 2 + (xx - 75) ** 2) < (50 + i) ** 2
        pixels = (disc[..., None] * rng.integers(60, 220, (120, 150, 3))).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.png")


def photos(root, cache):
    dm = build("data/fundus_folder", root=str(root), img_size=28, num_workers=0, max_side=64,
               pixel_cache_dir=str(cache) if cache else None)  # fmt: skip
    return dm, sorted(root.glob("*.png"))


def test_cached_pixels_equal_decoding_and_only_an_edited_file_is_processed_again(tmp_path):
    write_photos(tmp_path / "photos", 4)
    dm, paths = photos(tmp_path / "photos", tmp_path / "cache")
    plain, _ = photos(tmp_path / "photos", None)
    first = [np.asarray(dm.load(p)) for p in paths]
    assert dm.cache.stats()["misses"] == 4 and dm.cache.stats()["hits"] == 0
    assert all(np.array_equal(a, np.asarray(plain.load(p))) for a, p in zip(first, paths))
    again, _ = photos(tmp_path / "photos", tmp_path / "cache")  # a new run on the same cache
    assert all(np.array_equal(a, np.asarray(again.load(p))) for a, p in zip(first, paths))
    assert again.cache.stats()["hits"] == 4 and again.cache.stats()["misses"] == 0
    later = paths[2].stat().st_mtime_ns + 5_000_000_000
    os.utime(paths[2], ns=(later, later))  # edited (touched): only it is processed again
    third, _ = photos(tmp_path / "photos", tmp_path / "cache")
    for p in paths:
        third.load(p)
    assert third.cache.stats()["hits"] == 3 and third.cache.stats()["misses"] == 1


def test_a_corrupt_entry_is_detected_and_rebuilt(tmp_path, caplog):
    write_photos(tmp_path / "photos", 2)
    dm, paths = photos(tmp_path / "photos", tmp_path / "cache")
    expected = np.asarray(dm.load(paths[0]))
    entry = dm.cache.path(dm.cache.key(paths[0]))
    raw = bytearray(entry.read_bytes())
    raw[HEADER.size + 100] ^= 0xFF  # one flipped pixel byte: the size is right, the checksum is not
    entry.write_bytes(bytes(raw))
    fresh, _ = photos(tmp_path / "photos", tmp_path / "cache")
    assert np.array_equal(np.asarray(fresh.load(paths[0])), expected)
    assert fresh.cache.stats()["rebuilt"] == 1 and "checksum mismatch" in caplog.text
    entry.write_bytes(entry.read_bytes()[:50])  # truncated
    assert np.array_equal(
        np.asarray(photos(tmp_path / "photos", tmp_path / "cache")[0].load(paths[0])), expected
    )


def _fill(root, cache, barrier):
    dm, paths = photos(root, cache)
    barrier.wait()  # both processes start writing the same entries at once
    for p in paths:
        dm.load(p)


def test_two_processes_filling_one_cache_leave_it_intact(tmp_path):
    write_photos(tmp_path / "photos", 24)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_fill, args=(tmp_path / "photos", tmp_path / "cache", barrier))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert not list((tmp_path / "cache").rglob(".*"))  # no temporary file left behind
    check, paths = photos(tmp_path / "photos", tmp_path / "cache")
    plain, _ = photos(tmp_path / "photos", None)
    assert all(np.array_equal(np.asarray(check.load(p)), np.asarray(plain.load(p))) for p in paths)
    assert check.cache.stats()["hits"] == 24 and check.cache.stats()["rebuilt"] == 0


def test_volume_cache_reads_back_and_re_processes_only_an_edited_volume(tmp_path):
    """CT's persistent cache: a second setup preprocesses nothing (same tensors), a touched NIfTI alone is
    preprocessed again, a corrupt cache file is recomputed."""
    import nibabel as nib
    import torch

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"ct{i}.nii.gz")
        nib.save(
            nib.Nifti1Image(rng.uniform(-1000, 400, (12, 12, 8)).astype(np.float32), np.eye(4)), paths[-1]
        )
    (tmp_path / "m.csv").write_text(
        "volume,report,finding\n" + "".join(f"{p},r{i},{i % 2}\n" for i, p in enumerate(paths))
    )
    cache = tmp_path / "cache"

    def setup():
        data = build("data/ct", manifest=str(tmp_path / "m.csv"), cache_dir=str(cache), spacing=(2.0, 2.0, 2.0),
                     pad_size=(8, 8, 4), crop_size=(8, 8, 4), held_out_fraction=0.0, num_workers=0,
                     output_dir=str(tmp_path / "run"))  # fmt: skip
        before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")}
        data.setup()
        after = {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt")}
        return data, sum(before.get(p) != stamp for p, stamp in after.items())

    first, written = setup()
    assert written == 3
    second, written = setup()
    assert written == 0
    torch.testing.assert_close(second.probe_train_set[1][0], first.probe_train_set[1][0], rtol=0, atol=0)
    os.utime(paths[2], ns=(paths[2].stat().st_atime_ns, paths[2].stat().st_mtime_ns + 10**9))
    assert setup()[1] == 1
    from greenlab.data.volumes import source_stamp

    victim = next(cache.rglob(source_stamp({"image": str(paths[0].resolve())}).decode() + ".pt"))
    victim.write_bytes(b"not a tensor")
    third, written = setup()
    assert written == 1 and len(list(cache.rglob("*.pt"))) == 4  # 3 current + the touched volume's old one
    torch.testing.assert_close(third.probe_train_set[1][0], first.probe_train_set[1][0], rtol=0, atol=0)


def test_ct_and_mri_preprocessing_is_cached_whole(tmp_path):
    """PersistentDataset caches up to the first Randomizable transform (a nested Compose is one): neither
    modality's deterministic chain may hold one, or its cache would hold only the input paths."""
    from monai.transforms import Randomizable

    (tmp_path / "m.csv").write_text("volume,sagittal,coronal,axial\n")
    for config in ("data/ct", "data/mri"):
        data = build(config, manifest=str(tmp_path / "m.csv"), output_dir=str(tmp_path))
        assert not [t for t in data.preprocess.transforms if isinstance(t, Randomizable)], config


def test_a_batch_read_is_each_entry_in_its_place_and_rebuilds_a_corrupt_one(tmp_path, caplog):
    """``get_batch`` (the workers' read with data.augment_on=device): every entry straight into its slot of one
    uint8 batch, a smaller image black beyond its size, a corrupt or missing entry made again, nothing else."""
    write_photos(tmp_path / "photos", 3)
    Image.fromarray(np.full((40, 36, 3), 200, np.uint8)).save(
        tmp_path / "photos" / "photo3.png"
    )  # under max_side
    dm, paths = photos(tmp_path / "photos", tmp_path / "cache")
    alone = [np.asarray(dm.load(p)) for p in paths[:3]]  # cached; photo3 is not yet
    entry = dm.cache.path(dm.cache.key(paths[1]))
    raw = bytearray(entry.read_bytes())
    raw[HEADER.size + 7] ^= 0xFF
    entry.write_bytes(bytes(raw))
    fresh, _ = photos(tmp_path / "photos", tmp_path / "cache")
    with caplog.at_level("WARNING"):
        batch, sizes = fresh.cache.get_batch(paths, fresh.preprocess)
    assert "checksum mismatch" in caplog.text and fresh.cache.stats()["hits"] == 2
    assert batch.dtype == np.uint8 and batch.shape == (4, *alone[0].shape)
    last = np.asarray(fresh.load(paths[3]))
    assert sizes.tolist() == [list(a.shape[:2]) for a in [*alone, last]] and sizes[3].max() < sizes[0].max()
    for image, (h, w), expected in zip(batch, sizes, [*alone, last]):
        assert np.array_equal(image[:h, :w], expected) and not image[h:].any() and not image[:, w:].any()
