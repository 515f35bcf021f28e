"""Pre-training augmentations on the training device (``data.augment_on: device``).

The loader workers hand over each image's uint8 pixels untouched (a memory-mapped cache entry, no resampling) and
the batch is augmented after its transfer, here, by reading the very ``torchvision.transforms.v2`` pipeline the
workers would otherwise run (``transforms2d.PRETRAIN_TRANSFORMS``):

- ``check(pipeline)`` refuses, by name, a step this module cannot run;
- ``draw(pipeline, height, width)`` draws one image's parameters with the same calls on torch's generator, in the
  same order, as the v2 transforms make: the same distribution, and under one seed the same crop boxes, flips,
  angles and factors as the workers' path;
- ``augment(pixels, draws)`` applies a batch's draws with PIL's arithmetic on tensors:
  flips, side padding and rotation (PIL's nearest-neighbour affine about the centre, black fill) as one gather;
  brightness and contrast as PIL's ``ImageEnhance`` (a float32 blend truncated to uint8; contrast's grey level is
  the rounded mean ITU-R 601 luma of the whole rotated, padded image); every crop-and-resize choice
  (RandomResizedCrop, Resize + CenterCrop, Resize) as one box resampled with PIL's separable filters (bilinear =
  triangle, bicubic a = -0.5; antialiased: the support grows with the reduction), two batched matrix products,
  each pass rounded to uint8 as PIL does.

Where it differs from PIL: PIL holds the filter coefficients in 22-bit fixed point and walks the rotation's
source coordinates incrementally in float64; here the sums are float32 and the coordinates computed directly.
Pillow 13 also runs its two bicubic passes vertical-first for some sizes, and the uint8 rounding and clipping
between the passes then differ where the cubic overshoots. Under one seed, on a fixed fundus-like photograph
(tests/test_device_augment.py): bilinear (RETFound-Green, none) at most 1 grey level, bicubic (SparK, MAE) at most
10 (4 on a DRIVE photograph), each on a few per cent of the pixels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torchvision.transforms import v2

from greenlab.data.transforms2d import RandomSidePadding

FILTERS = {v2.InterpolationMode.BILINEAR: "bilinear", v2.InterpolationMode.BICUBIC: "bicubic"}
SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # PIL's filter supports, in source pixels at no reduction
CHUNK = 32  # images augmented at a time (bounds the device memory of the float intermediates)


@dataclass
class Axis:
    """One axis of a resample: output pixel ``t`` is centred at source ``origin + (t + offset + 0.5) * scale``,
    and the filter reads source pixels ``[low, high)`` only (a crop's own, else the whole image)."""

    origin: int
    offset: int
    scale: float
    low: int
    high: int
    size: int  # output pixels


@dataclass
class Draw:
    """One image's augmentation parameters, in the order the workers' pipeline applies them."""

    height: int  # source pixels
    width: int
    hflip: bool = False  # before anything else
    vflip: bool = False
    pad: int = 0  # black columns added left and right
    angle: float = 0.0  # degrees, counter-clockwise (PIL), about the padded image's centre
    brightness: float | None = None
    contrast: float | None = None
    brightness_first: bool = True
    rows: Axis | None = None  # the crop-and-resize
    columns: Axis | None = None
    filter: str = "bilinear"
    mirror: bool = False  # horizontal flip of the output
    resized: tuple[int, int] | None = field(default=None, repr=False)  # a Resize's size, until its CenterCrop

    @property
    def padded_width(self) -> int:
        return self.width + 2 * self.pad


LEAVES = (v2.RandomHorizontalFlip, v2.RandomVerticalFlip, RandomSidePadding, v2.RandomRotation, v2.ColorJitter,
          v2.RandomResizedCrop, v2.Resize, v2.CenterCrop, v2.ToImage, v2.PILToTensor)  # fmt: skip


def check(pipeline: v2.Transform) -> None:
    """Refuse a pipeline with a step ``augment`` cannot run (by its name and why); it must end in a resize."""
    leaves = list(_leaves(pipeline))
    for step in leaves:
        name = type(step).__name__
        if not isinstance(step, LEAVES):
            raise ValueError(f"data.augment_on=device cannot run {name}: supported steps are "
                             f"{[t.__name__ for t in LEAVES]} (use data.augment_on=workers)")  # fmt: skip
        if isinstance(step, v2.RandomRotation) and (
            _mode(step) != v2.InterpolationMode.NEAREST or step.expand or step.center is not None
        ):
            raise ValueError(f"data.augment_on=device runs {name} with nearest interpolation about the centre, "
                             "without expand, only")  # fmt: skip
        if isinstance(step, v2.RandomRotation) and step.fill not in (0, None):
            raise ValueError(f"data.augment_on=device runs {name} with a black fill only, not {step.fill!r}")
        if isinstance(step, v2.ColorJitter) and (step.saturation is not None or step.hue is not None):
            raise ValueError(f"data.augment_on=device runs {name}'s brightness and contrast only")
        if isinstance(step, v2.RandomResizedCrop | v2.Resize) and (
            _mode(step) not in FILTERS or step.antialias is False
        ):
            raise ValueError(f"data.augment_on=device runs {name} antialiased, bilinear or bicubic, only")
        if isinstance(step, v2.Resize) and step.max_size is not None:
            raise ValueError(f"data.augment_on=device runs {name} without max_size only")
    if not any(isinstance(s, v2.RandomResizedCrop | v2.Resize) for s in leaves):
        raise ValueError("data.augment_on=device needs a pipeline that resizes to the input size")
    # every step taken once, in order: an order it cannot run fails now, not on the first batch that draws it
    with torch.random.fork_rng(devices=[]):
        _walk(pipeline, Draw(64, 64), every=True)


def _mode(step) -> v2.InterpolationMode:
    """A step's interpolation as the enum (v2 keeps the enum or its text)."""
    return v2.InterpolationMode(step.interpolation)


def _leaves(step):
    inner = getattr(step, "transforms", None)
    if isinstance(step, v2.Compose | v2.RandomApply | v2.RandomChoice):
        for child in inner:
            yield from _leaves(child)
    else:
        yield step


def draw(pipeline: v2.Transform, height: int, width: int) -> Draw:
    """One image's parameters: the random calls of ``pipeline`` (checked by ``check``) on a ``height`` x
    ``width`` image, made on torch's generator in the order the v2 transforms make them."""
    sample = Draw(height, width)
    _walk(pipeline, sample)
    return sample


def _walk(step, d: Draw, every: bool = False) -> None:
    """Draw ``step``'s parameters into ``d``; ``every`` (``check``): every random step applied, every choice
    walked (the first one's state going on)."""
    if isinstance(step, v2.Compose):
        for child in step.transforms:
            _walk(child, d, every)
    elif isinstance(step, v2.RandomApply):
        if every or torch.rand(1) < step.p:
            for child in step.transforms:
                _walk(child, d, every)
    elif isinstance(step, v2.RandomChoice):
        if every:
            branches = [copy.deepcopy(d) for _ in step.transforms]
            for branch, child in zip(branches, step.transforms):
                _walk(child, branch, every)
            d.__dict__.update(branches[0].__dict__)
        else:
            _walk(step.transforms[int(torch.multinomial(torch.tensor(step.p), 1))], d)
    elif isinstance(step, v2.RandomHorizontalFlip | v2.RandomVerticalFlip):
        if not every and torch.rand(1) >= step.p:
            return
        vertical = isinstance(step, v2.RandomVerticalFlip)
        if d.rows is not None:
            if vertical:
                raise ValueError("data.augment_on=device: a vertical flip after the resize is not supported")
            d.mirror = not d.mirror
        elif d.pad or d.angle:
            raise ValueError("data.augment_on=device: flips after padding or rotation are not supported")
        elif vertical:
            d.vflip = not d.vflip
        else:
            d.hflip = not d.hflip
    elif isinstance(step, RandomSidePadding):
        _before_resize(d, "RandomSidePadding")
        if d.angle:
            raise ValueError("data.augment_on=device: padding after a rotation is not supported")
        d.pad += step.draw_pad(d.padded_width)
    elif isinstance(step, v2.RandomRotation):
        _before_resize(d, "RandomRotation")
        if d.angle:
            raise ValueError("data.augment_on=device: two rotations are not supported")
        d.angle = step.make_params([])["angle"]
    elif isinstance(step, v2.ColorJitter):
        _before_resize(d, "ColorJitter")
        params = step.make_params([])
        order = params["fn_idx"].tolist()
        d.brightness, d.contrast = params["brightness_factor"], params["contrast_factor"]
        d.brightness_first = order.index(0) < order.index(1)
    elif isinstance(step, v2.RandomResizedCrop):
        _before_resize(d, "RandomResizedCrop")
        box = step.make_params([torch.empty((3, d.height, d.padded_width), device="meta")])
        out_h, out_w = step.size
        d.rows = Axis(box["top"], 0, box["height"] / out_h, box["top"], box["top"] + box["height"], out_h)
        d.columns = Axis(box["left"], 0, box["width"] / out_w, box["left"], box["left"] + box["width"], out_w)
        d.filter = FILTERS[_mode(step)]
    elif isinstance(step, v2.Resize):
        _before_resize(d, "Resize")
        out_h, out_w = _resized_size(d.height, d.padded_width, list(step.size))
        d.rows = Axis(0, 0, d.height / out_h, 0, d.height, out_h)
        d.columns = Axis(0, 0, d.padded_width / out_w, 0, d.padded_width, out_w)
        d.filter, d.resized = FILTERS[_mode(step)], (out_h, out_w)
    elif isinstance(step, v2.CenterCrop):
        if d.resized is None:
            raise ValueError("data.augment_on=device runs CenterCrop right after a Resize only")
        (crop_h, crop_w), (out_h, out_w) = step.size, d.resized
        if crop_h > out_h or crop_w > out_w:
            raise ValueError(
                "data.augment_on=device: CenterCrop larger than the image (padding) is not supported"
            )
        d.rows.offset, d.rows.size = int(round((out_h - crop_h) / 2.0)), crop_h  # torchvision's center_crop
        d.columns.offset, d.columns.size = int(round((out_w - crop_w) / 2.0)), crop_w
        d.resized = None
    # ToImage / PILToTensor: nothing to draw


def _before_resize(d: Draw, name: str) -> None:
    if d.rows is not None:
        raise ValueError(f"data.augment_on=device: {name} after the resize is not supported")


def _resized_size(height: int, width: int, size: list[int]) -> tuple[int, int]:
    """torchvision's Resize output size: [h, w] as given; [s]: the short side s, the long side scaled (int)."""
    if len(size) == 2:
        return size[0], size[1]
    short, long = sorted((height, width))
    new_short, new_long = size[0], int(size[0] * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def augment(pixels: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """pixels (B, H, W, C) uint8, image b in ``[:draws[b].height, :draws[b].width]`` -> (B, C, h, w) uint8, each
    image as the workers' PIL path makes it from ``draws[b]`` (all the same output size)."""
    outputs = []
    for start in range(0, len(draws), CHUNK):
        chunk = draws[start : start + CHUNK]
        intermediate = _flip_pad_rotate(pixels[start : start + len(chunk)], chunk)
        intermediate = _jitter(intermediate, chunk)
        outputs.append(_resample(intermediate, chunk))
    return torch.cat(outputs)


def _flip_pad_rotate(pixels: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, Hi, Wi) float32: each image flipped, padded and rotated (nearest, PIL's affine
    ``Image.rotate``), black outside it and beyond its own size."""
    batch, height, width, channels = pixels.shape
    device = pixels.device
    rows = max(d.height for d in draws)
    columns = max(d.padded_width for d in draws)
    # PIL's nearest-neighbour affine in 16.16 fixed point (Geometry.c affine_fixed): source column of output
    # pixel (x, y) = (a2 + x a0 + y a1) >> 16, a* = floor(65536 v + 0.5) of the output -> input matrix
    fixed = torch.tensor(
        [_pil_fixed_point(_pil_rotation(d)) for d in draws], dtype=torch.int64, device=device
    )
    a0, a1, a2, a3, a4, a5 = (fixed[:, k].view(-1, 1, 1) for k in range(6))
    y = torch.arange(rows, dtype=torch.int64, device=device).view(1, -1, 1)
    x = torch.arange(columns, dtype=torch.int64, device=device).view(1, 1, -1)
    x_index = (a2 + x * a0 + y * a1) >> 16
    y_index = (a5 + x * a3 + y * a4) >> 16
    per_image = lambda values: torch.tensor(values, device=device).view(-1, 1, 1)  # noqa: E731
    h, w, pad = (
        per_image([d.height for d in draws]),
        per_image([d.width for d in draws]),
        per_image([d.pad for d in draws]),
    )
    inside = (
        (y_index >= 0) & (y_index < h) & (x < w + 2 * pad) & (y < h)
    )  # the rotated image: the padded size
    x_index = x_index - pad
    inside &= (x_index >= 0) & (x_index < w)  # inside the image, not its padding (nor left or right of both)
    x_index = torch.where(per_image([d.hflip for d in draws]), w - 1 - x_index, x_index)
    y_index = torch.where(per_image([d.vflip for d in draws]), h - 1 - y_index, y_index)
    flat = torch.where(inside, y_index * width + x_index, height * width)  # height * width: a black pixel
    source = torch.cat([pixels.reshape(batch, height * width, channels),
                        pixels.new_zeros(batch, 1, channels)], dim=1)  # fmt: skip
    gathered = torch.gather(source, 1, flat.view(batch, -1, 1).expand(-1, -1, channels))
    return gathered.view(batch, rows, columns, channels).permute(0, 3, 1, 2).float()


def _pil_rotation(d: Draw) -> list[float]:
    """PIL ``Image.rotate(angle)``'s output -> input affine (a, b, c, d, e, f) for the padded image, in float64
    as PIL computes it (identity without rotation)."""
    if not d.angle:
        return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    angle = -math.radians(d.angle)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    c_, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = d.padded_width / 2, d.height / 2
    return [a, b, a * -cx + b * -cy + cx, c_, e, c_ * -cx + e * -cy + cy]


def _pil_fixed_point(matrix: list[float]) -> list[int]:
    """(a0, a1, a2, a3, a4, a5) of ``affine_fixed``: the matrix in 16.16, the offsets at pixel centres."""
    a, b, c, d, e, f = matrix
    fix = lambda v: math.floor(v * 65536.0 + 0.5)  # noqa: E731
    return [fix(a), fix(b), fix(c + a * 0.5 + b * 0.5), fix(d), fix(e), fix(f + d * 0.5 + e * 0.5)]


def _jitter(images: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """PIL ``ImageEnhance`` brightness and contrast on the images that have them, in their drawn order."""
    chosen = [i for i, d in enumerate(draws) if d.brightness is not None or d.contrast is not None]
    if not chosen:
        return images
    for i in chosen:
        d = draws[i]
        image = images[i, :, : d.height, : d.padded_width]
        steps = [_brightness, _contrast] if d.brightness_first else [_contrast, _brightness]
        for step in steps:
            image = step(image, d)
        images[i, :, : d.height, : d.padded_width] = image
    return images


def _brightness(image: torch.Tensor, d: Draw) -> torch.Tensor:
    """PIL: ``blend(black, image, factor)`` in float32, truncated and clipped to [0, 255]."""
    if d.brightness is None:
        return image
    return torch.floor(image * _float32(d.brightness, image.device)).clamp_(0, 255)


def _contrast(image: torch.Tensor, d: Draw) -> torch.Tensor:
    """PIL: ``blend(grey, image, factor)``, grey = int(mean of the image's L + 0.5), L = 601 luma in 16-bit fixed
    point; float32, truncated and clipped to [0, 255]."""
    if d.contrast is None:
        return image
    red, green, blue = image.to(torch.int64)
    luma = (red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16
    total, count = luma.sum(), luma.numel()
    grey = torch.div(
        2 * total + count, 2 * count, rounding_mode="floor"
    ).float()  # int(mean + 0.5), on the device
    return torch.floor(grey + _float32(d.contrast, image.device) * (image - grey)).clamp_(0, 255)


def _float32(value: float, device) -> torch.Tensor:
    """PIL's blend factor: a C float."""
    return torch.tensor(value, dtype=torch.float32, device=device)


def _resample(images: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """(B, C, Hi, Wi) float -> (B, C, h, w) uint8: each image's box through PIL's filter, columns then rows, each
    pass rounded (half up) and clipped to uint8; then each output mirrored when drawn."""
    device = images.device
    columns = _weights([d.columns for d in draws], [d.filter for d in draws], images.shape[-1], device)
    rows = _weights([d.rows for d in draws], [d.filter for d in draws], images.shape[-2], device)
    horizontal = torch.floor(images @ columns.transpose(1, 2).unsqueeze(1) + 0.5).clamp_(0, 255)
    out = torch.floor(rows.unsqueeze(1) @ horizontal + 0.5).clamp_(0, 255)
    mirror = torch.tensor([d.mirror for d in draws], device=device).view(-1, 1, 1, 1)
    return torch.where(mirror, out.flip(-1), out).to(torch.uint8)


def _weights(axes: list[Axis], filters: list[str], length: int, device) -> torch.Tensor:
    """(B, out, length) float32: PIL's resampling coefficients (``precompute_coeffs``) for each image's axis."""
    sizes = {axis.size for axis in axes}
    if len(sizes) != 1:
        raise ValueError(
            f"data.augment_on=device: the pipeline gives images of sizes {sorted(sizes)}, not one"
        )
    (out,) = sizes
    column = lambda values: torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)  # noqa: E731
    origin, offset = column([a.origin for a in axes]), column([a.offset for a in axes])
    scale, low, high = (
        column([a.scale for a in axes]),
        column([a.low for a in axes]),
        column([a.high for a in axes]),
    )
    support_scale = torch.clamp(scale, min=1.0)
    t = torch.arange(out, dtype=torch.float32, device=device).view(1, -1, 1)  # float32: any GPU, MPS too
    j = torch.arange(length, dtype=torch.float32, device=device).view(1, 1, -1)
    centre = (t + offset + 0.5) * scale
    position = ((j - origin) + 0.5 - centre) * (1.0 / support_scale)
    cubic = column([f == "bicubic" for f in filters]).bool()
    weights = torch.where(cubic, _bicubic(position), _bilinear(position))
    weights = weights * ((j >= low) & (j < high))
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total == 0, 1.0, total)


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))
