"""MinkowskiEngine sparse convolution over the visible positions only, on the dense model's own weights.

``sparsify`` swaps module classes in place (like ``masked_dense.sparsify``) so that each module takes and
returns ``MinkowskiEngine.SparseTensor``: parameter names and shapes stay the dense model's, so the same
weights serve both backends and the trained encoder loads straight into the dense network.

- Conv2d (groups 1): ``MinkowskiConvolutionFunction`` on the dense kernel reordered to ME's layout
  (offset index k = dy + kh * dx); 1x1 stride-1 convs are a matmul.
- Depthwise Conv2d: a gather-scatter per kernel offset over ME's kernel map (MinkowskiEngine 0.5.4 has no
  grouped convolution; its ``MinkowskiChannelwiseConvolution`` is the same loop over offsets).
- BatchNorm2d / timm BatchNormAct2d: batch norm of the feature rows (= the active positions).
- timm SEModule: per-image mean of the rows, the SE MLP, gate broadcast back to the rows.
- Elementwise modules (activations, Dropout, Identity) act on the rows; Dropout2d drops whole
  (image, channel) pairs, as in the dense network.
- timm ReXNet ``LinearBottleneck``: its partial residual (first in_channels channels) on the rows.
"""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d
from timm.layers.squeeze_excite import SEModule
from timm.models.rexnet import LinearBottleneck
from torch import nn

from greenlab.compat import import_minkowski
from greenlab.sparse.masked_dense import batch_norm_rows

ME = import_minkowski()
from MinkowskiEngineBackend._C import ConvolutionMode  # noqa: E402  (after the import shim)


def _like(x: ME.SparseTensor, features: torch.Tensor) -> ME.SparseTensor:
    """New features on ``x``'s coordinates."""
    return ME.SparseTensor(
        features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
    )


def me_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense (out, in, kh, kw) -> ME (kh*kw, in, out): ME's offset k = dy + kh * dx."""
    return weight.permute(3, 2, 1, 0).reshape(
        weight.shape[2] * weight.shape[3], weight.shape[1], weight.shape[0]
    )


class MinkowskiConv:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if (
            self.padding_mode != "zeros"
            or self.dilation != (1, 1)
            or self.kernel_size[0] != self.kernel_size[1]
        ):
            raise NotImplementedError(
                f"{type(self).__name__}: only square, undilated, zero-padded convolutions"
            )
        if self.padding != tuple(k // 2 for k in self.kernel_size):
            raise NotImplementedError(
                f"{type(self).__name__}: needs 'same' padding (k // 2), has {self.padding}"
            )
        if self.groups == 1:
            out = self._dense_weight_conv(x)
        elif self.groups == self.in_channels == self.out_channels:
            out = self._depthwise_conv(x)
        else:
            raise NotImplementedError(f"grouped convolution with {self.groups} groups")
        if self.bias is not None:
            out = _like(out, out.F + self.bias)
        return out

    def _generator(self, x):
        return ME.KernelGenerator(
            kernel_size=self.kernel_size[0], stride=self.stride[0], dilation=1, dimension=2
        )

    def _dense_weight_conv(self, x):
        if self.kernel_size == (1, 1) and self.stride == (1, 1):
            return _like(x, x.F @ self.weight[:, :, 0, 0].t())
        generator = self._generator(x)
        manager = x.coordinate_manager
        out_key = manager.stride(x.coordinate_map_key, generator.kernel_stride)
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
        generator = self._generator(x)
        manager = x.coordinate_manager
        out_key = manager.stride(x.coordinate_map_key, generator.kernel_stride)
        kernel = me_kernel(self.weight)[:, 0, :]  # (K, C)
        region_type, region_offset, _ = generator.get_kernel(x.tensor_stride, False)
        kernel_map = manager.kernel_map(
            x.coordinate_map_key, out_key, generator.kernel_stride, generator.kernel_size, generator.kernel_dilation,
            region_type=region_type, region_offset=region_offset,
        )  # fmt: skip
        out = x.F.new_zeros(manager.size(out_key), self.in_channels)
        for k, (rows_in, rows_out) in kernel_map.items():
            out = out.index_add(0, rows_out.long().to(x.device), x.F[rows_in.long().to(x.device)] * kernel[k])
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=manager)


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


class MinkowskiDropout2d:
    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if not self.training or self.p == 0:
            return x
        batch = x.C[:, 0].long().to(x.device)
        keep = torch.rand(int(batch.max()) + 1, x.F.shape[1], device=x.device) >= self.p
        return _like(x, x.F * keep[batch].to(x.F.dtype) / (1 - self.p))


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


ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Identity, nn.Dropout)

MINKOWSKI_MIXINS: dict[type, type] = {
    LinearBottleneck: MinkowskiLinearBottleneck,
    SEModule: MinkowskiSqueezeExcite,
    nn.Conv2d: MinkowskiConv,
    nn.BatchNorm2d: MinkowskiBatchNorm,
    nn.Dropout2d: MinkowskiDropout2d,
    **{cls: MinkowskiElementwise for cls in ELEMENTWISE},
}


def sparsify(model: nn.Module) -> nn.Module:
    """Swap, in place, every module of ``model`` for its MinkowskiEngine form; returns ``model``."""
    from greenlab.sparse.masked_dense import sparsify as swap

    return swap(model, MINKOWSKI_MIXINS)


def to_sparse(images: torch.Tensor, mask: torch.Tensor) -> ME.SparseTensor:
    """images (B, C, H, W) and mask (B, 1, h, w) on the coarse grid -> SparseTensor of the visible pixels."""
    scale = images.shape[-1] // mask.shape[-1]
    full = mask.repeat_interleave(scale, -2).repeat_interleave(scale, -1)[:, 0]  # (B, H, W)
    coordinates = full.nonzero().int()  # (N, 3): batch, y, x
    features = images.permute(0, 2, 3, 1)[full]
    return ME.SparseTensor(features, coordinates=coordinates.contiguous())


def to_dense(x: ME.SparseTensor, batch: int, height: int, width: int) -> torch.Tensor:
    """SparseTensor at tensor stride s -> (B, C, height, width) with zeros at inactive positions."""
    stride = x.tensor_stride[0]
    coordinates = x.C.long().to(x.device)
    out = x.F.new_zeros(batch, height, width, x.F.shape[1])
    out[coordinates[:, 0], coordinates[:, 1] // stride, coordinates[:, 2] // stride] = x.F
    return out.permute(0, 3, 1, 2)
