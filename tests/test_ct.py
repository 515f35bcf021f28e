"""CT loading with MONAI: orientation, spacing, HU window, crops; NIfTI vs DICOM parity on a real scan."""

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from greenlab.config import CONFIG_DIR, build
from greenlab.data.ct import ct_preprocessing
from greenlab.data.transforms3d import volume_crops
from greenlab.labels.rules import RuleLabeller
from tests.conftest import shared_data

CT_YAML = OmegaConf.load(CONFIG_DIR / "data" / "_ct.yaml")  # the CT options' preprocessing
CHEST_CT = {k: tuple(CT_YAML[k]) for k in ("spacing", "hu_window", "pad_size")}  # the GreenRFM chest values
CHEST_CT["pad_value"] = CT_YAML.pad_value

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")


def dicom_series_to_nifti(folder, path):
    """An independent conversion: slices sorted along their normal, HU = raw x slope + intercept,
    the LPS patient affine from the DICOM geometry tags, turned into RAS for NIfTI."""
    slices = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    row_dir, col_dir = (
        np.array(slices[0].ImageOrientationPatient[:3], float),
        np.array(slices[0].ImageOrientationPatient[3:], float),
    )
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(normal, np.array(s.ImagePositionPatient, float))))
    positions = np.array([s.ImagePositionPatient for s in slices], float)
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    volume = np.stack(
        [s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices], axis=-1
    )
    volume = volume.transpose(1, 0, 2).astype(np.float32)  # (columns = i, rows = j, slices = k)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row_dir * col_spacing, col_dir * row_spacing, step
    affine[:3, 3] = positions[0]
    affine[:2] *= -1  # LPS -> RAS
    nib.save(nib.Nifti1Image(volume, affine), path)


def test_nifti_and_dicom_of_the_same_scan_give_the_same_tensor(tmp_path):
    folder = shared_data("totalsegmentator", "example_ct_dicom")
    nifti = tmp_path / "same_scan.nii.gz"
    dicom_series_to_nifti(folder, nifti)
    prepare = ct_preprocessing(**CHEST_CT)
    from_dicom = prepare({"image": str(folder)})["image"]
    from_nifti = prepare({"image": str(nifti)})["image"]
    assert from_dicom.shape == from_nifti.shape == (1, 240, 240, 120)
    torch.testing.assert_close(torch.as_tensor(from_dicom), torch.as_tensor(from_nifti), atol=1e-4, rtol=0)
    assert torch.as_tensor(from_dicom).std() > 0.1, "a real image, not padding only"


def test_real_ct_is_resampled_windowed_and_cropped():
    path = shared_data("totalsegmentator", "example_ct.nii.gz")  # 122 x 101 x 112 voxels of 3 mm, RAS
    volume = ct_preprocessing(**{**CHEST_CT, "pad_size": (256, 256, 128)})({"image": str(path)})["image"]
    assert tuple(np.round(volume.meta["pixdim"][1:4], 3)) == (1.5, 1.5, 3.0)
    # 366 x 303 x 336 mm -> 244 x 202 x 112 voxels, padded to 256 x 256 x 128 with 0 (the official pad value)
    assert volume.shape == (1, 256, 256, 128)
    inside = torch.as_tensor(volume)[0, 6:250, 27:229, 8:120]
    assert volume.min() == -1.0 and volume.max() == 1.0 and (inside > -1).float().mean() > 0.3
    assert torch.as_tensor(volume)[0, :, :5].abs().max() == 0.0, "the padded rows hold the official 0"
    crop = volume_crops((64, 64, 32), None)[1]({"image": volume})["image"]
    assert crop.shape == (1, 64, 64, 32)


def write_nifti(path, array, spacing=(2.0, 2.0, 2.0)):
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([*spacing, 1.0])), path)


def write_nifti_without_spacing(path, array):
    """A NIfTI-1 file whose header says pixdim[1] = 0 (nibabel's API refuses to write one): patch the bytes."""
    image = nib.Nifti1Image(array.astype(np.float32), None)
    nib.save(image, path)
    raw = bytearray(path.read_bytes())
    raw[80:84] = np.float32(0.0).tobytes()  # pixdim[1], little-endian float32 at byte 80 of the header
    path.write_bytes(bytes(raw))


def test_bad_volumes_are_named_or_listed(tmp_path):
    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "good.nii.gz", rng.normal(0, 300, (20, 20, 10)))
    nan = rng.normal(0, 300, (20, 20, 10))
    nan[3, 3, 3] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", nan)
    write_nifti_without_spacing(tmp_path / "flat.nii", rng.normal(0, 300, (20, 20, 10)))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "volume,report,effusion\ngood.nii.gz,Small effusion.,1\nnan.nii.gz,,0\nflat.nii,,0\nbroken.nii.gz,,1\n"
    )
    small = {"pad_size": (16, 16, 8), "crop_size": (8, 8, 4), "num_workers": 0}
    with pytest.raises(ValueError, match=r"nan\.nii\.gz.*NaN"):
        build("data/ct", cache_dir=None, manifest=str(manifest), **small).setup()
    data = build(
        "data/ct",
        cache_dir=None,
        manifest=str(manifest),
        skip_bad=True,
        held_out_fraction=0.0,
        output_dir=str(tmp_path / "run"),
        **small,
    )
    data.setup()
    assert len(data.pretrain_set) == 1 and data.train_reports == ["Small effusion."]
    image, labels = data.pretrain_set[0]
    assert image.shape == (1, 8, 8, 4) and labels.tolist() == [1]
    listed = (tmp_path / "run" / "skipped_inputs.csv").read_text()
    assert (
        "nan.nii.gz" in listed and "flat.nii" in listed and "spacing" in listed and "broken.nii.gz" in listed
    )


def test_labels_distilled_from_reports_cached_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["volume,report"]
    reports = ["Small right pleural effusion. No nodule.", "No pleural effusion. Possible nodule.",
               "No pleural effusion.", "There is a 5 mm nodule; no pleural effusion."]  # fmt: skip
    for i, report in enumerate(reports):
        write_nifti(tmp_path / f"v{i}.nii.gz", rng.normal(0, 300, (20, 20, 10)))
        rows.append(f'v{i}.nii.gz,"{report}"')
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    small = {"pad_size": (16, 16, 8), "crop_size": (8, 8, 4), "num_workers": 0, "held_out_fraction": 0.0}
    run = tmp_path / "run"
    make = lambda **more: build("data/ct", cache_dir=None, manifest=str(tmp_path / "manifest.csv"), labeller=RuleLabeller("ctrate18"),  # noqa: E731
                                pair_reports=True, output_dir=str(run), **small, **more)  # fmt: skip
    dropping = make(unlabelled_findings="drop")  # greenlab's option
    dropping.setup()
    assert [t.name for t in dropping.tasks] == [
        "lung_nodule",
        "pleural_effusion",
    ]  # the others: never labelled
    assert "medical_material" in dropping.dropped_findings
    data = make()  # official (data/ct_rate.py: every label column kept, blanks 0 under unmentioned=negative)
    data.setup()
    assert len(data.tasks) == 18 and not data.dropped_findings and "medical_material" in data.unlabelled
    names = [t.name for t in data.tasks]
    nodule, effusion = names.index("lung_nodule"), names.index("pleural_effusion")
    by_report = {
        data.pretrain_set[i][1]: data.pretrain_set[i][2][[nodule, effusion]].tolist() for i in range(4)
    }
    assert by_report[reports[0]] == [0, 1] and by_report[reports[1]] == [-2, 0]  # -2: uncertain
    image, report, labels = data.pretrain_set[0]
    assert image.shape == (1, 8, 8, 4) and isinstance(report, str)
    cached = (run / "report_labels.csv").read_text()
    again = make()  # a second setup reuses the cached labels file, unchanged
    again.setup()
    assert (run / "report_labels.csv").read_text() == cached
    (run / "report_labels.csv").write_text(cached.replace(",,,1,", ",,,yes,", 1))  # hand-edited
    with pytest.raises(ValueError, match=rf"{re.escape(str(run))}/report_labels\.csv: column .*'yes'"):
        make().setup()
    (run / "report_labels.csv").write_text(cached)
    (tmp_path / "manifest.csv").write_text((tmp_path / "manifest.csv").read_text().replace("5 mm", "6 mm"))
    with pytest.raises(ValueError, match="report_labels.csv was made from other reports"):
        make().setup()


def test_label_columns_with_bad_values_are_named(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", np.zeros((20, 20, 10)))
    (tmp_path / "m.csv").write_text("volume,report,effusion\nv.nii.gz,,2\n")
    with pytest.raises(ValueError, match=r"m\.csv: column 'effusion', row 2: '2' is not a finding label"):
        build(
            "data/ct",
            cache_dir=None,
            manifest=str(tmp_path / "m.csv"),
            pad_size=(16, 16, 8),
            crop_size=(8, 8, 4),
            num_workers=0,
        ).setup()


def test_mri_study_gives_one_tensor_per_plane(tmp_path):
    mr = shared_data("totalsegmentator", "example_mr_sm.nii.gz")
    (tmp_path / "mri.csv").write_text(f"sagittal,coronal,axial,report,lesion\n{mr},{mr},{mr},Lesion.,1\n")
    data = build("data/mri", cache_dir=None, manifest=str(tmp_path / "mri.csv"), series_size=(24, 24, 8), held_out_fraction=0.0,
                         num_workers=0, pair_reports=True)  # fmt: skip
    data.setup()
    planes, report, labels = data.pretrain_set[0]
    assert planes.shape == (3, 1, 24, 24, 8) and report == "Lesion." and labels.tolist() == [1]
    assert planes.min() >= -1 and planes.max() <= 1
    assert not torch.equal(planes[0], planes[2])  # the same volume resliced three ways
    assert build("backbone/three_plane_resnet3d18", depth=10, stem_kernel=2).eval()(planes[None]).shape == (
        1,
        512,
    )


def test_embedded_ct_is_deterministic_and_its_reports_label_as_drawn(tmp_path):
    import pandas as pd

    from greenlab.data.embedded_ct import FINDINGS, generate
    from greenlab.labels.vocabulary import load_vocabulary

    a, b = generate(tmp_path / "a", num_volumes=30), generate(tmp_path / "b", num_volumes=30)
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    assert np.array_equal(
        nib.load(a / "volumes/ct_0003.nii.gz").get_fdata(), nib.load(b / "volumes/ct_0003.nii.gz").get_fdata()
    )
    manifest, truth = pd.read_csv(a / "manifest.csv"), pd.read_csv(a / "truth.csv")
    labeller = RuleLabeller(load_vocabulary("ctrate18"))
    expected = {"present": 1, "negated": 0, "hedged": -1, "unmentioned": None}
    for i, report in enumerate(manifest["report"]):
        labels = labeller(report)
        assert {n: labels[n] for n in FINDINGS} == {n: expected[truth[f"{n}_statement"][i]] for n in FINDINGS}
    volume = nib.load(a / "volumes/ct_0000.nii.gz")
    assert volume.header.get_zooms() == (5.0, 5.0, 7.5) and nib.aff2axcodes(volume.affine) == ("R", "A", "S")


def test_one_mri_plane_is_a_volume_with_crops_and_three_refuse_them(tmp_path):
    """data.planes=[axial]: that series alone (1, ...), a volume for the 3D encoders and self-supervision."""
    mr = shared_data("totalsegmentator", "example_mr_sm.nii.gz")
    (tmp_path / "mri.csv").write_text(f"axial,lesion\n{mr},1\n")
    data = build("data/mri", cache_dir=None, manifest=str(tmp_path / "mri.csv"), planes=["axial"], series_size=(24, 24, 8),
                 crop_size=(16, 16, 8), held_out_fraction=0.0, num_workers=0)  # fmt: skip
    data.setup()
    volume, labels = data.pretrain_set[0]
    assert volume.shape == (1, 16, 16, 8) and labels.tolist() == [1]
    assert data.describe()["crop_size"] == [16, 16, 8]
    with pytest.raises(ValueError, match="one plane's series"):
        build("data/mri", manifest=str(tmp_path / "mri.csv"), crop_size=(16, 16, 8))
    with pytest.raises(ValueError, match="distinct planes"):
        build("data/mri", manifest=str(tmp_path / "mri.csv"), planes=["axial", "oblique"])


def test_a_ct_manifest_without_labels_pretrains_and_the_probe_says_why_it_has_nothing(tmp_path):
    """Pre-training needs only the volumes: a manifest of one column gives training volumes, no tasks, and a
    probe that reports "no labelled data" instead of failing."""
    for i in range(3):
        write_nifti(tmp_path / f"v{i}.nii.gz", np.random.default_rng(i).normal(0, 300, (20, 20, 10)))
    (tmp_path / "m.csv").write_text("volume\n" + "".join(f"v{i}.nii.gz\n" for i in range(3)))
    data = build("data/ct", cache_dir=None, manifest=str(tmp_path / "m.csv"), pad_size=(16, 16, 8), crop_size=(8, 8, 4),
                 num_workers=0, held_out_fraction=0.0)  # fmt: skip
    data.setup()
    volume, labels = data.pretrain_set[0]
    assert len(data.pretrain_set) == 3 and volume.shape == (1, 8, 8, 4) and labels.shape == (0,)
    assert data.tasks == [] and data.describe()["tasks"] == []
    probe = build("evaluation/linear_probe")
    assert probe(torch.nn.Identity(), data, torch.device("cpu")).metrics == {
        "probe_skipped": "no labelled data"
    }
