"""2D image transforms, for photographs and any other 2D images (fundus folders, MedMNIST 2D): the pre-training
augmentations by method (RETFound-Green, SparK, none), nn-MobileNet's and RETFound's fine-tuning pairs, the
evaluation resizes (greenlab's and RETFound-Green's official one), and the normalisation of uint8 training
batches on the device.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2


class RandomSidePadding(torch.nn.Module):
    """Black padding on the left and right, each side ``U[min_frac, max_frac]`` x width (paper: 33-150 px at 1024)."""

    def __init__(self, min_frac: float = 33 / 1024, max_frac: float = 150 / 1024):
        super().__init__()
        self.min_frac, self.max_frac = min_frac, max_frac

    def draw_pad(self, width: int) -> int:
        """The pixels added on each side of a ``width``-pixel image (one draw on torch's generator)."""
        return round(torch.empty(1).uniform_(self.min_frac, self.max_frac).item() * width)

    def forward(self, image: Image.Image) -> Image.Image:
        pad = self.draw_pad(image.width)
        return v2.functional.pad(image, [pad, 0, pad, 0], fill=0)


def retfound_green_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """The RETFound-Green pre-training augmentations, ending in a uint8 (3, img_size, img_size) tensor: the
    datamodule scales and normalises the batch on the training device (``normalise_batch``)."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(p=0.05),
            v2.RandomApply([RandomSidePadding()], p=0.1),
            v2.RandomApply([v2.RandomRotation(12.5)], p=0.25),
            v2.RandomApply([v2.ColorJitter(brightness=0.33, contrast=0.33)], p=0.25),
            v2.RandomChoice(
                [
                    v2.RandomResizedCrop(img_size, scale=(0.7, 1.0), ratio=(3 / 5, 5 / 3)),
                    # data.py: T.Resize(int(res * 1.3)): 509 px at 392 (round would give 510)
                    v2.Compose([v2.Resize(int(img_size * 1.3)), v2.CenterCrop(img_size)]),
                    v2.Resize((img_size, img_size)),
                ]
            ),
            v2.ToImage(),
        ]
    )


def spark_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """SparK pre-training augmentation (pretrain/utils/imagenet.py): RandomResizedCrop(scale 0.67-1, bicubic) +
    horizontal flip; uint8 tensor out (normalised on the device, ``normalise_batch``)."""
    return _crop_and_flip(img_size, (0.67, 1.0))


def mae_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """MAE pre-training augmentation (main_pretrain.py): RandomResizedCrop(scale 0.2-1, bicubic) + horizontal
    flip; uint8 tensor out (normalised on the device)."""
    return _crop_and_flip(img_size, (0.2, 1.0))


def _crop_and_flip(img_size: int, scale: tuple[float, float]) -> v2.Compose:
    bicubic = v2.InterpolationMode.BICUBIC
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=scale, interpolation=bicubic),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
        ]
    )


def finetune_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """nn-MobileNet's released fine-tuning augmentation (``dataset.py``, its default MICCAI / MMAC data):
    RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic), both flips, rotation by up to 180 degrees
    (bicubic, black fill), colour jitter 0.4 (brightness, contrast, saturation, hue), normalisation, then
    random erasing p 0.4."""
    bicubic = v2.InterpolationMode.BICUBIC
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=bicubic),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomRotation(180, interpolation=bicubic, fill=0),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4),
            *_to_normalised_tensor(mean, std),
            v2.RandomErasing(p=0.4),
        ]
    )


def finetune_eval_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """nn-MobileNet's evaluation transform: resize the short side to img_size / 0.875 (bicubic), centre crop."""
    return v2.Compose(
        [
            v2.Resize(int(img_size / (224 / 256)), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(img_size),
            *_to_normalised_tensor(mean, std),
        ]
    )


def finetune_transforms(
    img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[v2.Compose, v2.Compose]:
    """(training, scoring) transforms of k-fold fine-tuning on photographs: nn-MobileNet's pair (above)."""
    return finetune_transform(img_size, mean, std), finetune_eval_transform(img_size, mean, std)


def retfound_finetune_transforms(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple:
    """(training, scoring) transforms of RETFound's fine-tuning, ``util/datasets.py`` ``build_transform`` with
    main_finetune.py's defaults: training, timm ``create_transform`` (RandomResizedCrop scale 0.08-1, ratio
    3/4-4/3, bicubic; horizontal flip 0.5; RandAugment ``rand-m9-mstd0.5-inc1``, ``--aa``; no colour jitter,
    ``--color_jitter None``; normalisation; random erasing p 0.25, per-pixel, once: ``--reprob``, ``--remode``,
    ``--recount``); scoring, the short side resized (bicubic) to img_size / crop_pct (crop_pct 224/256 up to 224
    px, else 1), a centre crop, normalisation."""
    from timm.data import create_transform

    training = create_transform(input_size=img_size, is_training=True, color_jitter=None,
                                auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
                                re_mode="pixel", re_count=1, mean=tuple(mean), std=tuple(std))  # fmt: skip
    crop_pct = 224 / 256 if img_size <= 224 else 1.0
    scoring = v2.Compose(
        [
            v2.Resize(int(img_size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(img_size),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return training, scoring


# k-fold fine-tuning's (training, scoring) pairs for 2D images by recipe (``evaluation.augmentation``; null: the
# data's ``fold_transforms``, nn-MobileNet's for photographs)
FINETUNE_TRANSFORMS = {"nn_mobilenet": finetune_transforms, "retfound": retfound_finetune_transforms}


def eval_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """Resize to (img_size, img_size) and normalise; what embeddings are computed from."""
    return v2.Compose([v2.Resize((img_size, img_size)), *_to_normalised_tensor(mean, std)])


def official_eval_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """RETFound-Green's inference preprocessing (Training_and_eval_code/data_preprocessing_splits_and_subsamples/
    Ours_IDRID_Inference.ipynb and Ours_ROP_Inference.ipynb, cell 0; data.py ``get_default_transforms``): the raw
    photograph as a uint8 tensor (``read_image``), ``Resize((img_size, img_size), antialias=True)`` of the tensor
    (the aspect ratio squashed, no crop), ``ToDtype(float32, scale=True)``, ``Normalize(mean, std)``."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((img_size, img_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def resize_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """No augmentation: ``eval_transform``'s resize, uint8 out (normalised on the device, ``normalise_batch``:
    the same values)."""
    return v2.Compose([v2.Resize((img_size, img_size)), v2.ToImage()])


# none: no augmentation at all (ablations; exact comparisons such as single-process vs DDP)
PRETRAIN_TRANSFORMS = {
    "retfound_green": retfound_green_transform,
    "spark": spark_transform,
    "mae": mae_transform,
    "none": resize_transform,
}


def normalise_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 scaled to [0, 1] and normalised, on the images' device: the same
    arithmetic as ``ToDtype(float32, scale=True)`` + ``Normalize`` (bit for bit), one kernel per batch on the
    GPU instead of per-sample work in the loader workers."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def _to_normalised_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
