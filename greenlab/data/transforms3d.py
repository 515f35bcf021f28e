"""3D augmentations of training volumes (MONAI), for self-supervised pre-training and k-fold fine-tuning in 3D.

``volume_augmentation`` returns the random transforms applied to a training volume after its crop, on the
dict key ``"image"`` ((C, X, Y, Z) float): a random resized crop (each side a fraction in ``crop_scale`` of the
volume, drawn per axis, resized back, trilinear), a flip along each axis (``flip_prob`` each), a small affine
(``affine_prob``: rotation up to +-``rotate_deg`` degrees about each axis and an isotropic zoom within
+-``scale``, trilinear, border padding), and intensity jitter (``intensity_prob`` each: x(1 + U(+-
``intensity_scale``)), then + U(+-``intensity_shift``), in the volume's own units).

No paper pre-trains these methods in 3D, so these are greenlab's choices, the 3D counterparts of SparK's
and RETFound-Green's 2D ones (random resized crop, flip, mild colour jitter), off by default: the data options
keep the official GreenRFM pipeline (a random crop only), the 3D self-supervised experiments choose
``data/volume_augmentation=light`` (``greenlab/conf/data/volume_augmentation``). What was applied is in
results.json (``data.volume_augmentation``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai import transforms as mt


def volume_augmentation(crop_scale: tuple[float, float], flip_prob: float, affine_prob: float, rotate_deg: float,
                        scale: float, intensity_prob: float, intensity_scale: float,
                        intensity_shift: float) -> list[mt.Transform]:  # fmt: skip
    """The random transforms on {"image": (C, X, Y, Z)}, in the order the module doc gives; a list, to be
    placed in one flat ``Compose`` after the crop."""
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(
            f"volume_augmentation.crop_scale must be 0 < low <= high <= 1, not {list(crop_scale)}"
        )
    angle = math.radians(rotate_deg)
    chain: list[mt.Transform] = [RandResizedCropd("image", crop_scale)] if low < 1 else []
    chain += [mt.RandFlipd("image", prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    chain += [
        mt.RandAffined(
            "image",
            prob=affine_prob,
            rotate_range=(angle, angle, angle),
            scale_range=scale,
            mode="bilinear",
            padding_mode="border",
        ),  # fmt: skip
        mt.RandScaleIntensityd("image", factors=intensity_scale, prob=intensity_prob),
        mt.RandShiftIntensityd("image", offsets=intensity_shift, prob=intensity_prob),
    ]
    return chain


class RandResizedCropd(mt.RandomizableTransform, mt.MapTransform):
    """{key: (C, X, Y, Z)}: a random box, each side ``U(crop_scale)`` x the volume's along that axis (at least
    one voxel), resized back to the volume's size (trilinear): the 3D ``RandomResizedCrop``."""

    def __init__(self, key: str, crop_scale: tuple[float, float]):
        mt.MapTransform.__init__(self, [key])
        mt.RandomizableTransform.__init__(self, prob=1.0)
        self.crop_scale = tuple(crop_scale)

    def __call__(self, data):
        key = self.keys[0]
        volume = torch.as_tensor(data[key]).as_subclass(torch.Tensor)
        size = volume.shape[1:]
        box = [max(1, round(side * self.R.uniform(*self.crop_scale))) for side in size]
        start = [int(self.R.randint(0, side - b + 1)) for side, b in zip(size, box)]
        crop = volume[(slice(None), *(slice(a, a + b) for a, b in zip(start, box)))]
        resized = F.interpolate(crop[None].float(), size=tuple(size), mode="trilinear", align_corners=False)
        return {**data, key: resized[0]}


def volume_crops(crop_size, augmentation: dict | None) -> tuple[mt.Compose, mt.Compose]:
    """(training, evaluation) chains on {"image": (C, X, Y, Z)} -> plain tensors: a random ``crop_size`` crop
    then ``volume_augmentation(**augmentation)`` for training, the centre ``crop_size`` crop for evaluation
    (crop_size None: the whole volume; augmentation None: none)."""
    train, evaluate = [], []
    if crop_size is not None:
        train.append(mt.RandSpatialCropd("image", roi_size=tuple(crop_size), random_size=False))
        evaluate.append(mt.CenterSpatialCropd("image", roi_size=tuple(crop_size)))
    if augmentation:
        train += volume_augmentation(**augmentation)
    as_tensor = mt.ToTensord("image", track_meta=False)
    return mt.Compose([*train, as_tensor]), mt.Compose([*evaluate, as_tensor])
