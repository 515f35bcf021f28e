"""MRI studies with a sagittal, a coronal and an axial series, one tensor each (GreenRFM's MRI variant).

Each series (NIfTI or DICOM folder): load -> checked (3D, finite, spacing) -> orientation RAS -> the
through-plane axis moved last (sagittal: R-L, coronal: A-P, axial: S-I) -> per-series intensity scaling
(0.5th-99.5th percentile to [-1, 1], clipped; MRI has no HU) -> resized to ``series_size`` (in-plane,
in-plane, slices). A sample's volumes are the three stacked: (3, 1, *series_size).
"""

from __future__ import annotations

import torch
from monai import transforms as mt

from greenlab.data.volumes import CheckVolumed, VolumeDataModule

PLANES = ("sagittal", "coronal", "axial")
THROUGH_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # in RAS voxel order


def mri_series_preprocessing(plane: str, series_size) -> list[mt.Transform]:
    """The transforms {plane: path} -> {plane: (1, in-plane, in-plane, slices) float in [-1, 1]}: a list, for
    one flat Compose (MONAI's PersistentDataset caches up to the first Randomizable, and a Compose is one)."""
    axis = THROUGH_PLANE_AXIS[plane]
    in_plane = [a for a in range(3) if a != axis]
    order = (0, *(1 + a for a in in_plane), 1 + axis)
    return [
        mt.LoadImaged(plane, ensure_channel_first=True, image_only=True),
        CheckVolumed(plane),
        mt.Orientationd(plane, axcodes="RAS"),
        mt.Lambdad(plane, lambda v: v.permute(*order)),
        mt.ScaleIntensityRangePercentilesd(plane, lower=0.5, upper=99.5, b_min=-1.0, b_max=1.0, clip=True),
        mt.Resized(plane, spatial_size=tuple(series_size), mode="trilinear"),
    ]


class StackPlanesd(mt.Transform):
    """{sagittal, coronal, axial: (1, ...)} -> {"image": (3, 1, ...)} plain tensor."""

    def __call__(self, data):
        out = {k: v for k, v in data.items() if k not in PLANES}
        out["image"] = torch.stack([torch.as_tensor(data[p]).as_subclass(torch.Tensor) for p in PLANES])
        return out


class MRIDataModule(VolumeDataModule):
    """Three-series MRI studies: manifest columns ``sagittal``, ``coronal``, ``axial`` (paths relative to the
    manifest), optional report, labels as for CT. Args: manifest, series_size (in-plane, in-plane, slices),
    and those of ``VolumeDataModule``. No crop: each series is resized to ``series_size`` whole."""

    def __init__(self, manifest: str, series_size, **kwargs):
        series_size = tuple(series_size)
        preprocessing = mt.Compose(
            [*(t for p in PLANES for t in mri_series_preprocessing(p, series_size)), StackPlanesd()]
        )
        super().__init__(manifest, volumes={p: p for p in PLANES}, preprocessing=preprocessing,
                         crops=(mt.Compose([]), mt.Compose([])), geometry={"series_size": series_size},
                         **kwargs)  # fmt: skip
