"""SparK: BERT-style masked image modelling for CNNs through sparse convolution (Tian et al., ICLR 2023),
applied to nn-MobileNet as in "BERT-style sparse CNN pre-training" for retinal images, to any 2D CNN with a
feature hierarchy up to stride 32 (SparK's ResNets and ConvNeXts; greenlab/backbones/hierarchy.py), and in 3D
to volumes (greenlab's extension: GreenRFM's r3d_18 or any 3D CNN with a hierarchy; MinkowskiEngine is
N-dimensional, masked-dense re-masks Conv3d the same way).

Per image (volume), a random 60 % of the cells of the input / r grid are masked, r the encoder's total
stride (2D: 32, as SparK; r3d_18: 16). The encoder (the dense CNN sparsified: ``sparse_backend``
masked_dense or minkowski) sees only the visible cells and returns its feature maps f_s at its strides s
(nn-MobileNet: 2..32; ResNet, ConvNeXt: 4..32; r3d_18: 2..16), zero at masked positions. Deepest first, each
is *densified*:

    d_s = P_s( fill_s( N_s(f_s) ) )    N_s: BatchNorm over active positions (ResNets, nn-MobileNet) or
                                       LayerNorm per position (ConvNeXt), ``densify_norm``
                                       fill_s: masked positions <- learned mask token m_s (C_s,)
                                       P_s: 1x1 conv at /r (identity when C_r = w_0), 3x3 conv elsewhere
                                       -> decoder width w_i = decoder_width / 2^i at stride r / 2^i

and SparK's ``LightDecoder`` upsamples in log2(r) blocks (2D: 5; ConvTranspose k4 s2, then two 3x3 conv +
BN; 3D the same ops in 3D), adding d_s before the block at stride s (a stride without a map adds nothing),
to a prediction x̂ of the input's shape. With p = r^D x C patches of the input, normalised per patch (mean
0, std 1 over the patch), the loss is the MSE of masked patches only:

    L = Σ_{patches j masked} mean_values (x̂_j - norm(x_j))²  /  #masked

Volumes are masked, encoded and reconstructed in the encoder's own axis order (``to_network``).
"""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from greenlab.backbones.hierarchy import first_conv, forward_hierarchy, spatial_dims, to_network
from greenlab.contracts import require_fit
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import decay_param_groups, iterations_per_epoch, log_train_loss
from greenlab.objectives.optim import optimizer as build_optimizer
from greenlab.objectives.patches import (
    masked_patch_mse,
    normalised_patches,
    patch_statistics,
    patchify,
    unpatchify,
)
from greenlab.sparse import choose_backend, masked_dense

LAYERS = {  # spatial dimensions -> (conv, transposed conv, batch norm)
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


def random_visible_mask(batch: int, grid: tuple[int, ...], mask_ratio: float, device) -> torch.Tensor:
    """(B, 1, *grid) bool, True = visible: exactly round(cells x (1 - ratio)) visible cells per image."""
    cells = math.prod(grid)
    keep = max(1, round(cells * (1 - mask_ratio)))
    order = torch.rand(batch, cells, device=device).argsort(dim=1)
    visible = torch.zeros(batch, cells, dtype=torch.bool, device=device)
    visible.scatter_(1, order[:, :keep], True)
    return visible.view(batch, 1, *grid)


def masked_patch_loss(prediction: torch.Tensor, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """MSE to per-patch-normalised values, averaged over each patch, mean over masked patches only.

    prediction, images (B, C, *spatial); visible (B, 1, *grid) bool, one cell per patch.
    """
    patch = images.shape[2] // visible.shape[2]
    target = normalised_patches(patchify(images, patch))
    return masked_patch_mse(patchify(prediction.float(), patch), target.float(), ~visible.flatten(1))


def lr_wd_annealing(
    step: int,
    warmup_steps: int,
    total_steps: int,
    start_ratio: float,
    min_ratio: float,
    weight_decay: float,
    weight_decay_end: float,
) -> tuple[float, float]:
    """(multiplier of the peak lr, weight decay) at optimiser step ``step``, SparK's per-iteration schedule
    (pretrain/utils/lr_control.py ``lr_wd_annealing``): lr linear from ``start_ratio`` x peak to the peak over
    ``warmup_steps``, then a half cosine to ``min_ratio`` x peak at the last step (``total_steps`` - 1); weight
    decay a half cosine from ``weight_decay`` to ``weight_decay_end`` over all steps. Past the last step both
    stay at their final values."""
    step = min(step, total_steps - 1)
    if step < warmup_steps:
        lr = start_ratio + (1 - start_ratio) * step / warmup_steps
    else:
        ratio = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
        lr = min_ratio + (1 - min_ratio) * (0.5 + 0.5 * math.cos(math.pi * ratio))
    ratio = step / max(1, total_steps - 1)
    return lr, weight_decay_end + (weight_decay - weight_decay_end) * (0.5 + 0.5 * math.cos(math.pi * ratio))


def lr_at_step(step: int, **schedule) -> float:
    """The lr multiplier of ``lr_wd_annealing`` (a LambdaLR factor)."""
    return lr_wd_annealing(step, **schedule)[0]


def init_decoder(module: nn.Module) -> None:
    """SparK's ``LightDecoder.initialize`` (pretrain/decoder.py): convolutions and linear layers truncated
    normal (std 0.02), transposed convolutions Kaiming normal (fan out, ReLU), biases 0, norms weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class UpsampleBlock(nn.Module):
    """x2 upsampling: ConvTranspose(k4, s2) then two 3x3 conv + BN (ReLU6 between), in ``dims`` D."""

    def __init__(self, cin: int, cout: int, dims: int = 2):
        super().__init__()
        conv, transposed, norm = LAYERS[dims]
        self.up = transposed(cin, cin, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            conv(cin, cin, 3, padding=1, bias=False), norm(cin), nn.ReLU6(inplace=True),
            conv(cin, cout, 3, padding=1, bias=False), norm(cout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class Densify(nn.Module):
    """Norm over visible positions (``bn``: BatchNorm statistics over them; ``ln``: LayerNorm, eps 1e-6, per
    position, 2D), learned mask token at masked ones, projection to the decoder width (SparK's identity where
    the deepest map already has it)."""

    def __init__(self, channels: int, width: int, kernel: int, norm: str, dims: int = 2):
        super().__init__()
        conv, _, batch_norm = LAYERS[dims]
        self.norm = (
            masked_dense.sparsify(batch_norm(channels)) if norm == "bn" else LayerNorm2d(channels, 1e-6)
        )
        self.mask_token = nn.Parameter(torch.zeros(1, channels, *[1] * dims))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # SparK: truncated at one std
        if kernel == 1 and channels == width:
            self.proj = nn.Identity()
        else:
            self.proj = conv(channels, width, kernel, padding=kernel // 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        visible = masked_dense.mask_at(features)
        return self.proj(torch.where(visible, self.norm(features), self.mask_token.to(features.dtype)))


class SparKPretraining(PretrainingModule):
    """Args:
    backbone: a CNN with a feature hierarchy (``tap_names``, ``channels``, ``strides`` up to 32: ``NNMobileNet``,
        any timm CNN from ``create_timm_model``; in 3D up to its own total stride: ``ResNet3D``).
    sparse_backend: ``masked_dense`` or ``minkowski`` (same semantics; see greenlab/sparse), or ``auto``:
        the faster one on this device type according to ``make bench`` (``greenlab.sparse.fastest_backend``),
        masked_dense when MinkowskiEngine is not installed (recorded; ``minkowski`` then fails at start-up).
    mask_ratio: masked fraction of the input / total-stride cells.
    decoder_width: width after the deepest level (halved at each upsampling).
    densify_norm: ``bn`` | ``ln`` | ``auto`` (SparK's rule: ``ln`` for a network with LayerNorms, i.e.
        ConvNeXt, ``bn`` for the others).
    base_lr: lr = base_lr x the global batch / 256 (``effective_batch_size``).
    optimizer: ``adamw`` | ``lamb`` (SparK's ImageNet recipe: LAMB, global gradient norm clipped to 5 in its
        step).
    weight_decay -> weight_decay_end, warmup_epochs, cosine_epochs, start_lr_ratio, min_lr_ratio: SparK's
        per-iteration schedule (``lr_wd_annealing``) over cosine_epochs x the steps per epoch.
    encoder_dropout: the rate of the encoder's dropout layers while pre-training (nn-MobileNet's spatial
        dropout; SparK pre-trains with none), restored in ``trained_backbone``; None keeps the backbone's.
    figure_dir / figure_every_n_epochs: reconstruction figures (input / masked / prediction), also logged to
        W&B.
    """

    needs = ("hierarchy",)  # 2D or 3D

    def __init__(
        self,
        backbone: nn.Module,
        sparse_backend: str,
        mask_ratio: float,
        decoder_width: int,
        densify_norm: str,
        base_lr: float,
        optimizer: str,
        betas: tuple[float, float],
        weight_decay: float,
        weight_decay_end: float,
        warmup_epochs: int,
        cosine_epochs: int,
        start_lr_ratio: float,
        min_lr_ratio: float,
        encoder_dropout: float | None,
        figure_dir: str | None,
        figure_every_n_epochs: int,
    ):
        super().__init__()
        sparse_backend, why = choose_backend(sparse_backend, "gpu" if torch.cuda.is_available() else "cpu")
        self.backend_choice = {"sparse_backend": sparse_backend, "sparse_backend_reason": why}
        require_fit(self, backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams.sparse_backend = sparse_backend
        self.encoder = backbone
        self.backbone_dropout = {  # restored in trained_backbone
            name: m.p for name, m in backbone.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
        }
        if encoder_dropout is not None:
            for name in self.backbone_dropout:
                self.encoder.get_submodule(name).p = encoder_dropout
        if sparse_backend == "minkowski":
            from greenlab.sparse import minkowski

            minkowski.sparsify(self.encoder)
        else:
            masked_dense.sparsify(self.encoder)
        if densify_norm == "auto":
            densify_norm = "ln" if any(isinstance(m, nn.LayerNorm) for m in backbone.modules()) else "bn"
        if densify_norm not in ("bn", "ln"):
            raise ValueError(f"densify_norm must be auto, bn or ln, not {densify_norm!r}")
        self.hparams.densify_norm = densify_norm
        self.downsample = backbone.strides[-1]  # the mask cell = the patch = the encoder's total stride
        self.dims = spatial_dims(backbone)
        upsamplings = round(math.log2(self.downsample))
        widths = [decoder_width // 2**i for i in range(upsamplings + 1)]
        levels = [
            round(math.log2(self.downsample // s)) for s in backbone.strides
        ]  # decoder block of each map
        self.densify = nn.ModuleList(
            Densify(c, widths[i], 1 if i == 0 else 3, densify_norm, self.dims)
            for i, c in reversed(list(zip(levels, backbone.channels)))
        )  # deepest first
        self.decoder = nn.ModuleList(
            UpsampleBlock(widths[i], widths[i + 1], self.dims) for i in range(upsamplings)
        )
        in_chans = first_conv(backbone).in_channels
        self.to_pixels = LAYERS[self.dims][0](widths[-1], in_chans, kernel_size=1)
        init_decoder(self.decoder)
        init_decoder(self.to_pixels)

    def encode(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        """Hierarchical features of the visible cells, dense (B, C_s, *spatial / s), zero where masked; images
        and visible in the encoder's axis order."""
        if self.hparams.sparse_backend == "minkowski":
            from greenlab.sparse import minkowski

            maps = forward_hierarchy(self.encoder, minkowski.to_sparse(images, visible))
            b, spatial = images.shape[0], images.shape[2:]
            return [
                minkowski.to_dense(m, b, *(n // s for n in spatial))
                for m, s in zip(maps, self.encoder.strides)
            ]
        return forward_hierarchy(self.encoder, images * masked_dense.mask_at(images))

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, *spatial) in the encoder's axis order, visible (B, 1, *spatial / r) -> (loss,
        prediction of the images' shape)."""
        with masked_dense.active_mask(visible):
            features = self.encode(images, visible)
            densified = {
                s: d(f) for d, s, f in zip(self.densify, *map(reversed, (self.encoder.strides, features)))
            }
        x = 0
        for i, block in enumerate(self.decoder):  # stride r / 2^i -> r / 2^(i+1)
            stride = self.downsample >> i
            x = block(x + densified[stride] if stride in densified else x)
        prediction = self.to_pixels(x)
        return masked_patch_loss(prediction, images, visible), prediction

    def training_step(self, batch, batch_idx):
        images = to_network(self.encoder, batch[0])
        if images.ndim != self.dims + 2 or any(n % self.downsample for n in images.shape[2:]):
            raise ValueError(
                f"SparK on {type(self.encoder).__name__} takes {self.dims}D inputs whose sides are multiples of its "
                f"total stride {self.downsample} (the mask cell); the data gives {tuple(batch[0].shape)}"
            )
        grid = tuple(n // self.downsample for n in images.shape[2:])
        visible = random_visible_mask(images.shape[0], grid, self.hparams.mask_ratio, images.device)
        loss, prediction = self(images, visible)
        log_train_loss(self, loss, images.shape[0])
        if batch_idx == 0 and self._figure_due() and self.trainer.is_global_zero:
            self.save_reconstruction(images, visible, prediction)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Weight decay of the decayed group at this optimiser step (the lr follows the LambdaLR)."""
        hp = self.hparams
        _, wd = lr_wd_annealing(self.global_step, self.warmup_steps, self.total_steps, hp.start_lr_ratio,
                                hp.min_lr_ratio, hp.weight_decay, hp.weight_decay_end)  # fmt: skip
        for group in self.trainer.optimizers[0].param_groups:
            if group["decayed"]:
                group["weight_decay"] = wd
        self.log("train/weight_decay", wd, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        """SparK's optimiser (AdamW or LAMB) over its parameter groups (pretrain/utils/lr_control.py
        ``get_param_groups``: no decay on 1-D parameters, biases and mask tokens), the lr and weight decay of
        ``lr_wd_annealing`` set before every optimiser step."""
        hp = self.hparams
        lr = hp.base_lr * self.effective_batch_size / 256
        groups = decay_param_groups(
            [self.encoder, self.densify, self.decoder, self.to_pixels], hp.weight_decay, ("mask_token",)
        )
        groups[0]["decayed"], groups[1]["decayed"] = True, False
        per_epoch = iterations_per_epoch(self)
        self.warmup_steps, self.total_steps = (
            hp.warmup_epochs * per_epoch,
            max(1, hp.cosine_epochs * per_epoch),
        )
        built = build_optimizer(groups, lr, hp.betas, hp.optimizer)
        factor = partial(
            lr_at_step, warmup_steps=self.warmup_steps,
            total_steps=self.total_steps, start_ratio=hp.start_lr_ratio, min_ratio=hp.min_lr_ratio,
            weight_decay=hp.weight_decay, weight_decay_end=hp.weight_decay_end,
        )  # fmt: skip
        return {
            "optimizer": built,
            "lr_scheduler": {"scheduler": LambdaLR(built, factor), "interval": "step"},
        }

    def run_notes(self) -> dict:
        return self.backend_choice

    def trained_backbone(self) -> nn.Module:
        """A dense copy of the encoder: the plain network (nn-MobileNet, timm's CNN) with the pre-trained weights."""
        dense = masked_dense.densify(copy.deepcopy(self.encoder))
        for name, rate in self.backbone_dropout.items():
            dense.get_submodule(name).p = rate
        return dense

    # --- reconstruction figures
    def _figure_due(self) -> bool:
        every = self.hparams.figure_every_n_epochs
        if not every:
            return False
        return self.current_epoch % every == 0 or self.current_epoch == self.trainer.max_epochs - 1

    @torch.no_grad()
    def save_reconstruction(self, images, visible, prediction, rows: int = 4) -> Path | None:
        """PNG of input / masked input / prediction (visible cells pasted back, as SparK shows it); volumes as
        their three orthogonal mid-slices (channel 0), one row each."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n, p = min(rows, images.shape[0]), self.downsample
        images, visible, prediction = images[:n].float(), visible[:n], prediction[:n].float()
        mean, std = patch_statistics(patchify(images, p))
        restored = unpatchify(patchify(prediction, p) * std + mean, images.shape[1], *images.shape[2:], p)
        with masked_dense.active_mask(visible):
            full = masked_dense.mask_at(images)
        panels = [images, images * full, torch.where(full, images, restored)]
        pictures = [[_pictures(panel[r]) for panel in panels] for r in range(n)]  # [sample][panel][plane]
        planes = len(pictures[0][0])
        fig, axes = plt.subplots(n * planes, 3, figsize=(6, 2 * n * planes), squeeze=False)
        for r in range(n):
            for c, title in enumerate(("input", "masked", "prediction")):
                for k, picture in enumerate(pictures[r][c]):
                    ax = axes[r * planes + k][c]
                    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
                    ax.axis("off")
                    if r == k == 0:
                        ax.set_title(title)
        fig.tight_layout()
        path = None
        if self.hparams.figure_dir:
            path = Path(self.hparams.figure_dir) / f"reconstruction_epoch{self.current_epoch:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=80)
        for logger in self.loggers:
            if hasattr(logger, "log_image") and path is not None:
                logger.log_image(key="train/reconstruction", images=[str(path)], step=self.global_step)
        plt.close(fig)
        return path


def _pictures(sample: torch.Tensor) -> list:
    """One image (C, H, W) -> [its (H, W, C) picture]; one volume (C, D, H, W) -> its three orthogonal
    mid-slices of channel 0; each scaled to [0, 1]."""
    if sample.ndim == 3:
        slices = [sample.permute(1, 2, 0) if sample.shape[0] == 3 else sample[0]]
    else:
        volume = sample[0]
        slices = [
            volume[volume.shape[0] // 2],
            volume[:, volume.shape[1] // 2],
            volume[:, :, volume.shape[2] // 2],
        ]
    return [((x - x.min()) / (x.max() - x.min() + 1e-8)).cpu().numpy() for x in slices]
