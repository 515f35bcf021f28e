"""MRI studies with a sagittal, a coronal and an axial series, one tensor each (GreenRFM's MRI variant).

Each series (NIfTI or DICOM folder): load -> checked (3D, finite, spacing) -> orientation RAS -> the
through-plane axis moved last (sagittal: R-L, coronal: A-P, axial: S-I) -> per-series intensity scaling
(0.5th-99.5th percentile to [-1, 1], clipped; MRI has no HU) -> resized to ``series_size`` (in-plane,
in-plane, slices). A sample's volumes are the chosen ``planes``' series stacked, (P, 1, *series_size), for
GreenRFM's three-plane encoder (``backbone=three_plane_resnet3d18``); with one plane (``data.planes=[axial]``) a
sample is that series alone, (1, *series_size), a volume for any 3D encoder and every 3D self-supervised
objective. ``crop_size`` (random for training, centred for evaluation) and ``volume_augmentation`` act on a
single plane's series only.
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
    """{plane: (1, ...) for each of ``planes``} -> {"image": (P, 1, ...)} plain tensor; one plane: {"image":
    (1, ...)}, its series as it is."""

    def __init__(self, planes: tuple[str, ...]):
        self.planes = planes

    def __call__(self, data):
        out = {k: v for k, v in data.items() if k not in self.planes}
        series = [torch.as_tensor(data[p]).as_subclass(torch.Tensor) for p in self.planes]
        out["image"] = series[0] if len(series) == 1 else torch.stack(series)
        return out


class MRIDataModule(VolumeDataModule):
    """MRI studies: manifest columns named as the ``planes`` (``sagittal``, ``coronal``, ``axial``; paths
    relative to the manifest), optional report, labels as for CT. Args: manifest, planes (which series, in
    that order), series_size (in-plane, in-plane, slices: each series resized to it whole), crop_size /
    volume_augmentation (one plane only: None, or as for CT), and those of ``VolumeDataModule``."""

    def __init__(self, manifest: str, planes: list[str], series_size, crop_size, volume_augmentation: dict | None,
                 **kwargs):  # fmt: skip
        planes, series_size = tuple(planes), tuple(series_size)
        unknown = [p for p in planes if p not in PLANES]
        if unknown or not planes or len(set(planes)) < len(planes):
            raise ValueError(f"data.planes must be distinct planes of {list(PLANES)}, not {list(planes)}")
        if len(planes) > 1 and (crop_size is not None or volume_augmentation):
            raise ValueError(f"data.crop_size and data.volume_augmentation act on one plane's series; with "
                             f"planes {list(planes)} set them to null (or choose one plane)")  # fmt: skip
        preprocessing = mt.Compose(
            [*(t for p in planes for t in mri_series_preprocessing(p, series_size)), StackPlanesd(planes)]
        )
        super().__init__(manifest, volumes={p: p for p in planes}, preprocessing=preprocessing,
                         crop_size=crop_size, volume_augmentation=volume_augmentation,
                         geometry={"series_size": series_size, "planes": list(map(PLANES.index, planes))},
                         **kwargs)  # fmt: skip
