"""MinkowskiEngine sparse convolution over the visible positions only, on the dense model's own weights.

``sparsify`` swaps module classes in place (like ``masked_dense.sparsify``) so that each module takes and
returns ``MinkowskiEngine.SparseTensor``: parameter names and shapes stay the dense model's, so the same
weights serve both backends and the trained encoder loads straight into the dense network.

2D and 3D alike (MinkowskiEngine is N-dimensional; the tensor's dimension picks the kernel's):

- Conv2d / Conv3d (groups 1): ``MinkowskiConvolutionFunction`` on the dense kernel reordered to ME's layout
  (offset index k = dy + kh * dx); 1x1 stride-1 convs are a matmul. 'Same' padding (k // 2, odd k) or a
  patchifying conv (k = stride, no padding: ConvNeXt's stem and downsampling).
- FLOPs: MinkowskiEngine's convolutions and the depthwise loop report theirs (``greenlab.sparse.add_sparse_flops``:
  2 per multiply-add over the kernel map's pairs, x 3 for forward, input and weight gradients); torch's
  FlopCounterMode, which counts the rest, cannot see them.
- Depthwise Conv2d: a gather-scatter per kernel offset over ME's kernel map (MinkowskiEngine 0.5.4 has no
  grouped convolution; its ``MinkowskiChannelwiseConvolution`` is the same loop over offsets).
- MaxPool2d / 3d: the maximum over each window's active positions, by the same kernel map (ME's own max pooling
  is this maximum); the masked-dense backend takes the maximum with the window's zeros too, so the two agree
  where the input is >= 0, as after the ReLU before every ResNet's max-pool.
- BatchNorm2d / 3d, timm BatchNormAct2d: batch norm of the feature rows (= the active positions).
- LayerNorm / LayerNorm2d (ConvNeXt), Linear: per row (they act on each position alone).
- timm SEModule: per-image mean of the rows, the SE MLP, gate broadcast back to the rows.
- Elementwise modules (activations, Dropout, Identity) act on the rows; Dropout2d drops whole
  (image, channel) pairs and DropPath whole images, as in the dense network.
- Residual blocks: timm ResNet's ``BasicBlock`` / ``Bottleneck`` add the shortcut's rows (MinkowskiEngine's
  sum of tensors on one coordinate map); ReXNet's ``LinearBottleneck`` its partial residual (first
  in_channels channels); ConvNeXt's block its LayerNorm + MLP + layer scale on the rows, then the shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, DropPath
from timm.layers import activations as timm_activations
from timm.layers.squeeze_excite import SEModule
from timm.models.convnext import ConvNeXtBlock
from timm.models.rexnet import LinearBottleneck
from torch import nn

from greenlab.compat import import_minkowski
from greenlab.sparse import add_sparse_flops, sparse_flops_open
from greenlab.sparse.masked_dense import batch_norm_rows

ME = import_minkowski()
from MinkowskiEngineBackend._C import ConvolutionMode  # noqa: E402  (after the import shim)


def _like(x: ME.SparseTensor, features: torch.Tensor) -> ME.SparseTensor:
    """New features on ``x``'s coordinates."""
    return ME.SparseTensor(
        features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
    )


def me_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense (out, in, k1, .., kD) -> ME (k1*..*kD, in, out): ME's offset index runs fastest along the first
    spatial axis (2D: k = dy + kh * dx)."""
    spatial = range(weight.ndim - 1, 1, -1)
    return weight.permute(*spatial, 1, 0).reshape(-1, weight.shape[1], weight.shape[0]).contiguous()


def _one(values, name: str, module) -> int:
    """The single value of a per-axis setting (kernel, stride, padding): ME windows are cubes."""
    values = (values,) if isinstance(values, int) else tuple(values)
    if len(set(values)) != 1:
        raise NotImplementedError(
            f"{type(module).__name__}: {name} {values}: MinkowskiEngine windows are cubes"
        )
    return values[0]


def _check_window(module, kernel: int, stride: int, padding: int) -> None:
    """A window ME computes as the dense op does: odd k with 'same' padding k // 2, or k = stride unpadded."""
    same = kernel % 2 == 1 and padding == kernel // 2
    patchify = kernel == stride and padding == 0
    if not (same or patchify):
        raise NotImplementedError(
            f"{type(module).__name__}: kernel {kernel}, stride {stride}, padding {padding}: MinkowskiEngine's "
            "window matches the dense one for an odd kernel with padding k // 2, or kernel = stride unpadded"
        )


def _kernel_map(x: ME.SparseTensor, kernel: int, stride: int):
    """(output coordinate key, {offset k: (input rows, output rows)}) of a k^D window at ``stride``."""
    generator = ME.KernelGenerator(kernel_size=kernel, stride=stride, dilation=1, dimension=x.D)
    manager = x.coordinate_manager
    out_key = manager.stride(x.coordinate_map_key, generator.kernel_stride)
    region_type, region_offset, _ = generator.get_kernel(x.tensor_stride, False)
    kernel_map = manager.kernel_map(
        x.coordinate_map_key, out_key, generator.kernel_stride, generator.kernel_size, generator.kernel_dilation,
        region_type=region_type, region_offset=region_offset,
    )  # fmt: skip
    return out_key, {k: (i.long().to(x.device), o.long().to(x.device)) for k, (i, o) in kernel_map.items()}


class MinkowskiConv:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if self.padding_mode != "zeros" or _one(self.dilation, "dilation", self) != 1:
            raise NotImplementedError(f"{type(self).__name__}: only undilated, zero-padded convolutions")
        kernel, stride = _one(self.kernel_size, "kernel", self), _one(self.stride, "stride", self)
        _check_window(self, kernel, stride, _one(self.padding, "padding", self))
        if self.groups == 1:
            out = self._dense_weight_conv(x)
        elif self.groups == self.in_channels == self.out_channels:
            out = self._depthwise_conv(x)
        else:
            raise NotImplementedError(f"grouped convolution with {self.groups} groups")
        if self.bias is not None:
            out = _like(out, out.F + self.bias)
        return out

    def _dense_weight_conv(self, x):
        if set(self.kernel_size) == {1} and set(self.stride) == {1}:
            return _like(x, x.F @ self.weight.flatten(1).t())
        generator = ME.KernelGenerator(kernel_size=self.kernel_size[0], stride=self.stride[0], dimension=x.D)
        manager = x.coordinate_manager
        out_key = manager.stride(x.coordinate_map_key, generator.kernel_stride)
        if sparse_flops_open():  # ME's kernel runs outside torch's FLOP counter
            pairs = sum(len(i) for i, _ in _kernel_map(x, self.kernel_size[0], self.stride[0])[1].values())
            add_sparse_flops(pairs, self.in_channels * self.out_channels)
        features = ME.MinkowskiConvolutionFunction.apply(
            x.F,
            me_kernel(self.weight),
            generator,
            ConvolutionMode.DEFAULT,
            x.coordinate_map_key,
            out_key,
            manager,
        )
        return ME.SparseTensor(features, coordinate_map_key=out_key, coordinate_manager=manager)

    def _depthwise_conv(self, x):
        out_key, kernel_map = _kernel_map(x, self.kernel_size[0], self.stride[0])
        kernel = me_kernel(self.weight)[:, 0, :]  # (K, C)
        out = x.F.new_zeros(x.coordinate_manager.size(out_key), self.in_channels)
        for k, (rows_in, rows_out) in kernel_map.items():
            out = out.index_add(0, rows_out, x.F[rows_in] * kernel[k])
        add_sparse_flops(
            sum(len(i) for i, _ in kernel_map.values()), self.in_channels
        )  # elementwise: uncounted by torch
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=x.coordinate_manager)


class MinkowskiMaxPool:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        kernel, stride = _one(self.kernel_size, "kernel", self), _one(self.stride, "stride", self)
        padding = _one(self.padding, "padding", self)
        if _one(self.dilation, "dilation", self) != 1 or self.ceil_mode:
            raise NotImplementedError(f"{type(self).__name__}: only undilated max-pooling without ceil_mode")
        _check_window(self, kernel, stride, padding)
        out_key, kernel_map = _kernel_map(x, kernel, stride)
        out = x.F.new_full((x.coordinate_manager.size(out_key), x.F.shape[1]), float("-inf"))
        for rows_in, rows_out in kernel_map.values():
            index = rows_out[:, None].expand(-1, x.F.shape[1])
            out = out.scatter_reduce(0, index, x.F[rows_in], reduce="amax", include_self=True)
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=x.coordinate_manager)


class MinkowskiBatchNorm:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        out = _like(x, batch_norm_rows(self, x.F))  # the rows are the active positions
        if isinstance(self, BatchNormAct2d):  # its drop and act were swapped for row-wise forms
            out = self.act(self.drop(out))
        return out


class MinkowskiSqueezeExcite:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        batch = x.C[:, 0].long().to(x.device)
        size = int(batch.max()) + 1
        total = x.F.new_zeros(size, x.F.shape[1]).index_add(0, batch, x.F)
        count = torch.bincount(batch, minlength=size).clamp(min=1).unsqueeze(1).to(x.F.dtype)
        x_se = (total / count)[:, :, None, None]  # (B, C, 1, 1): the dense SE MLP as it is
        gate = self.gate(self.fc2(self.act(self.bn(self.fc1(x_se)))))[:, :, 0, 0]
        return _like(x, x.F * gate[batch])


class MinkowskiElementwise:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return _like(x, super().forward(x.F))


class MinkowskiLayerNorm:  # nn.LayerNorm over the channels of each row; LayerNorm2d's permutes are not needed
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return _like(x, F.layer_norm(x.F, self.normalized_shape, self.weight, self.bias, self.eps))


def _per_image_keep(x: ME.SparseTensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Rows' keep factors (0 or 1 / (1 - p)) drawn per image (and channel, ``shape`` (B, C) or (B, 1))."""
    batch = x.C[:, 0].long().to(x.device)
    keep = torch.rand(int(batch.max()) + 1, *shape, device=x.device) >= p
    return keep[batch].to(x.F.dtype) / (1 - p)


class MinkowskiDropout2d:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if not self.training or self.p == 0:
            return x
        return _like(x, x.F * _per_image_keep(x, (x.F.shape[1],), self.p))


class MinkowskiDropPath:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if not self.training or self.drop_prob == 0:
            return x
        return _like(x, x.F * _per_image_keep(x, (1,), self.drop_prob))


class MinkowskiConvNeXtBlock:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        shortcut = x
        x = self.mlp(self.norm(self.conv_dw(x)))  # per row: LayerNorm, Linear - GELU - Linear
        if self.gamma is not None:
            x = _like(x, x.F * self.gamma)
        return _like(x, self.drop_path(x).F + self.shortcut(shortcut).F)


class MinkowskiLinearBottleneck:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        shortcut = x
        if self.conv_exp is not None:
            x = self.conv_exp(x)
        x = self.conv_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.act_dw(x)
        x = self.conv_pwl(x)
        if self.use_shortcut:  # stride 1: same coordinates, same row order
            if self.drop_path is not None:
                x = self.drop_path(x)
            x = _like(
                x, torch.cat([x.F[:, : self.in_channels] + shortcut.F, x.F[:, self.in_channels :]], dim=1)
            )
        return x


ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Identity, nn.Dropout, nn.Linear,
               timm_activations.GELU, timm_activations.Swish, timm_activations.HardSwish)  # fmt: skip

MINKOWSKI_MIXINS: dict[type, type] = {
    LinearBottleneck: MinkowskiLinearBottleneck,
    ConvNeXtBlock: MinkowskiConvNeXtBlock,
    SEModule: MinkowskiSqueezeExcite,
    nn.Conv2d: MinkowskiConv,
    nn.Conv3d: MinkowskiConv,
    nn.MaxPool2d: MinkowskiMaxPool,
    nn.MaxPool3d: MinkowskiMaxPool,
    nn.BatchNorm2d: MinkowskiBatchNorm,
    nn.BatchNorm3d: MinkowskiBatchNorm,
    nn.LayerNorm: MinkowskiLayerNorm,  # LayerNorm2d is one
    nn.Dropout2d: MinkowskiDropout2d,
    DropPath: MinkowskiDropPath,
    **{cls: MinkowskiElementwise for cls in ELEMENTWISE},
}


def sparsify(model: nn.Module) -> nn.Module:
    """Swap, in place, every module of ``model`` for its MinkowskiEngine form; returns ``model``."""
    from greenlab.sparse.masked_dense import sparsify as swap

    return swap(model, MINKOWSKI_MIXINS)


def to_sparse(images: torch.Tensor, mask: torch.Tensor) -> ME.SparseTensor:
    """images (B, C, *spatial) and mask (B, 1, *grid) on the coarse grid -> SparseTensor of the visible
    pixels (voxels): coordinates (N, 1 + D) = batch, then the spatial axes in order."""
    full = mask[:, 0]
    for axis, (size, cells) in enumerate(zip(images.shape[2:], mask.shape[2:]), start=1):
        full = full.repeat_interleave(size // cells, axis)
    coordinates = full.nonzero().int()
    features = images.movedim(1, -1)[full]
    return ME.SparseTensor(features, coordinates=coordinates.contiguous())


def to_dense(x: ME.SparseTensor, batch: int, *size: int) -> torch.Tensor:
    """SparseTensor at tensor stride s -> (B, C, *size) with zeros at inactive positions."""
    stride = x.tensor_stride[0]
    coordinates = x.C.long().to(x.device)
    out = x.F.new_zeros(batch, *size, x.F.shape[1])
    out[(coordinates[:, 0], *(coordinates[:, 1 + a] // stride for a in range(len(size))))] = x.F
    return out.movedim(-1, 1)
