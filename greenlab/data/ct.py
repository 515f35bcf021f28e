"""CT volumes, NIfTI files or DICOM series folders, listed in a CSV manifest, prepared with MONAI.

Deterministic part (cached on disk, greenlab/data/volumes.py): load -> channel first -> checked ->
orientation RAS -> resample to ``spacing`` mm (bilinear) -> HU window [lo, hi] mapped to [-1, 1], clipped
-> pad (with ``pad_value``) / crop to ``pad_size``. Then a random ``crop_size`` crop for training, the centre
crop for evaluation (GreenRFM chest CT: 1.5 x 1.5 x 3 mm, [-1000, 200] HU, 240x240x120, crops 192x192x96).

As the official pipeline (SadVoxel/GreenRFM ``data/ct_rate.py``): the window maps [-1000, 200] HU linearly to
[-1, 1] ((HU + 400) / 600, clipped); MONAI's ``ResizeWithPadOrCrop`` pads with its default constant 0 (the
middle of the window, -400 HU; ``pad_value=-1`` pads with air instead); training takes a random crop of the
padded volume. At evaluation the official code centre-crops the volume without padding it first; the centre
crop of the padded volume is the same region for every volume at least ``crop_size`` large (and smaller ones,
which the official loader cannot batch, are padded here).
"""

from __future__ import annotations

from monai import transforms as mt

from greenlab.data.volumes import CheckVolumed, VolumeDataModule


def ct_preprocessing(spacing, hu_window, pad_size, pad_value) -> mt.Compose:
    """The deterministic, cacheable part: {"image": path} -> {"image": (1, X, Y, Z) float in [-1, 1]}."""
    return mt.Compose(
        [
            mt.LoadImaged("image", ensure_channel_first=True, image_only=True),
            CheckVolumed("image", target_spacing=spacing),
            mt.Orientationd("image", axcodes="RAS"),
            mt.Spacingd("image", pixdim=tuple(spacing), mode="bilinear"),
            mt.ScaleIntensityRanged(
                "image", a_min=hu_window[0], a_max=hu_window[1], b_min=-1.0, b_max=1.0, clip=True
            ),
            mt.ResizeWithPadOrCropd("image", spatial_size=tuple(pad_size), constant_values=pad_value),
        ]
    )


class CTDataModule(VolumeDataModule):
    """CT studies: Args: manifest, volume_column, spacing / hu_window / pad_size / crop_size (see module
    doc), and those of ``VolumeDataModule`` (crop, augmentation, labels, reports, labeller, split, cache,
    loaders)."""

    def __init__(self, manifest: str, volume_column: str, spacing, hu_window, pad_size, pad_value: float,
                 **kwargs):  # fmt: skip
        geometry = {"spacing": spacing, "hu_window": hu_window, "pad_size": pad_size, "pad_value": pad_value}
        super().__init__(manifest, volumes={"image": volume_column}, preprocessing=ct_preprocessing(**geometry),
                         geometry=geometry, **kwargs)  # fmt: skip
