"""CT loading with MONAI: orientation, spacing, HU window, crops; NIfTI vs DICOM parity on a real scan."""

import numpy as np
import pytest
import torch

from greenlab.data.ct import CTDataModule, ct_crop, ct_preprocessing
from tests.conftest import shared_data

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
    prepare = ct_preprocessing()
    from_dicom = prepare({"image": str(folder)})["image"]
    from_nifti = prepare({"image": str(nifti)})["image"]
    assert from_dicom.shape == from_nifti.shape == (1, 240, 240, 120)
    torch.testing.assert_close(torch.as_tensor(from_dicom), torch.as_tensor(from_nifti), atol=1e-4, rtol=0)
    assert torch.as_tensor(from_dicom).std() > 0.1, "a real image, not padding only"


def test_real_ct_is_resampled_windowed_and_cropped():
    path = shared_data("totalsegmentator", "example_ct.nii.gz")  # 122 x 101 x 112 voxels of 3 mm, RAS
    volume = ct_preprocessing(pad_size=(256, 256, 128))({"image": str(path)})["image"]
    assert tuple(np.round(volume.meta["pixdim"][1:4], 3)) == (1.5, 1.5, 3.0)
    # 366 x 303 x 336 mm -> 244 x 202 x 112 voxels, padded with air (-1) to 256 x 256 x 128
    assert volume.shape == (1, 256, 256, 128)
    inside = torch.as_tensor(volume)[0, 6:250, 27:229, 8:120]
    assert volume.min() == -1.0 and volume.max() == 1.0 and (inside > -1).float().mean() > 0.3
    crop = ct_crop((64, 64, 32), train=False)({"image": volume})["image"]
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
        CTDataModule(str(manifest), **small).setup()
    data = CTDataModule(
        str(manifest), skip_bad=True, held_out_fraction=0.0, output_dir=str(tmp_path / "run"), **small
    )
    data.setup()
    assert len(data.pretrain_set) == 1 and data.reports == ["Small effusion."]
    image, labels = data.pretrain_set[0]
    assert image.shape == (1, 8, 8, 4) and labels.tolist() == [1]
    listed = (tmp_path / "run" / "skipped_inputs.csv").read_text()
    assert (
        "nan.nii.gz" in listed and "flat.nii" in listed and "spacing" in listed and "broken.nii.gz" in listed
    )
