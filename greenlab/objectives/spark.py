"""SparK: BERT-style masked image modelling for CNNs through sparse convolution (Tian et al., ICLR 2023),
applied to nn-MobileNet as in "BERT-style sparse CNN pre-training" for retinal images, and to any CNN with a
feature hierarchy up to stride 32 (SparK's ResNets and ConvNeXts; greenlab/backbones/hierarchy.py).

Per image, a random 60 % of the cells of the input/32 grid are masked. The encoder (the dense CNN
sparsified: ``sparse_backend`` masked_dense or minkowski) sees only the visible cells and returns its
feature maps f_s at its strides s (nn-MobileNet: 2..32; ResNet, ConvNeXt: 4..32), zero at masked positions.
Deepest first, each is *densified*:

    d_s = P_s( fill_s( N_s(f_s) ) )    N_s: BatchNorm over active positions (ResNets, nn-MobileNet) or
                                       LayerNorm per position (ConvNeXt), ``densify_norm``
                                       fill_s: masked positions <- learned mask token m_s (C_s,)
                                       P_s: 1x1 conv at /32 (identity when C_32 = w_0), 3x3 conv elsewhere
                                       -> decoder width w_i = decoder_width / 2^i at stride 32 / 2^i

and SparK's ``LightDecoder`` upsamples in log2(32) = 5 blocks (ConvTranspose k4 s2, then two 3x3 conv +
BN), adding d_s before the block at stride s (a stride without a map adds nothing), to a (B, 3, H, W)
prediction x̂. With p = 32x32x3 patches of the image,
normalised per patch (mean 0, std 1 over the patch), the loss is the MSE of masked patches only:

    L = Σ_{patches j masked} mean_pixels (x̂_j - norm(x_j))²  /  #masked
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from timm.layers import LayerNorm2d
from torch import nn

from greenlab.backbones.hierarchy import DOWNSAMPLE, forward_hierarchy
from greenlab.contracts import require_fit
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import adamw_warmup_cosine, decay_param_groups, log_train_loss
from greenlab.objectives.patches import (
    masked_patch_mse,
    normalised_patches,
    patch_statistics,
    patchify,
    unpatchify,
)
from greenlab.sparse import choose_backend, masked_dense

UPSAMPLINGS = 5  # log2(DOWNSAMPLE): the decoder's blocks, /32 -> /1


def random_visible_mask(batch: int, grid: tuple[int, int], mask_ratio: float, device) -> torch.Tensor:
    """(B, 1, h, w) bool, True = visible: exactly round(h*w*(1-ratio)) visible cells per image."""
    cells = grid[0] * grid[1]
    keep = max(1, round(cells * (1 - mask_ratio)))
    order = torch.rand(batch, cells, device=device).argsort(dim=1)
    visible = torch.zeros(batch, cells, dtype=torch.bool, device=device)
    visible.scatter_(1, order[:, :keep], True)
    return visible.view(batch, 1, *grid)


def masked_patch_loss(prediction: torch.Tensor, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """MSE to per-patch-normalised pixels, averaged over each patch, mean over masked patches only.

    prediction, images (B, 3, H, W); visible (B, 1, H/32, W/32) bool.
    """
    target = normalised_patches(patchify(images, DOWNSAMPLE))
    return masked_patch_mse(patchify(prediction.float(), DOWNSAMPLE), target.float(), ~visible.flatten(1))


class UpsampleBlock(nn.Module):
    """x2 upsampling: ConvTranspose(k4, s2) then two 3x3 conv + BN (ReLU6 between)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class Densify(nn.Module):
    """Norm over visible positions (``bn``: BatchNorm statistics over them; ``ln``: LayerNorm, eps 1e-6, per
    position), learned mask token at masked ones, projection to the decoder width (SparK's identity where
    the deepest map already has it)."""

    def __init__(self, channels: int, width: int, kernel: int, norm: str):
        super().__init__()
        self.norm = (
            masked_dense.sparsify(nn.BatchNorm2d(channels)) if norm == "bn" else LayerNorm2d(channels, 1e-6)
        )
        self.mask_token = nn.Parameter(torch.zeros(1, channels, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # SparK: truncated at one std
        if kernel == 1 and channels == width:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Conv2d(channels, width, kernel, padding=kernel // 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        visible = masked_dense.mask_at(features)
        return self.proj(torch.where(visible, self.norm(features), self.mask_token.to(features.dtype)))


class SparKPretraining(PretrainingModule):
    """Args:
    backbone: a CNN with a feature hierarchy (``tap_names``, ``channels``, ``strides`` up to 32: ``NNMobileNet``,
        any timm CNN from ``create_timm_model``).
    sparse_backend: ``masked_dense`` or ``minkowski`` (same semantics; see greenlab/sparse), or ``auto``:
        the faster one on this device type according to ``make bench`` (``greenlab.sparse.fastest_backend``),
        masked_dense when MinkowskiEngine is not installed (recorded; ``minkowski`` then fails at start-up).
    mask_ratio: masked fraction of the input/32 cells.
    decoder_width: width after the deepest level (halved at each upsampling).
    densify_norm: ``bn`` | ``ln`` | ``auto`` (SparK's rule: ``ln`` for a network with LayerNorms, i.e.
        ConvNeXt, ``bn`` for the others).
    base_lr: lr = base_lr x the global batch / 256 (``effective_batch_size``).
    optimizer: ``adamw`` | ``lamb`` (SparK's ImageNet recipe: LAMB, global gradient norm clipped to 5 in its
        step).
    weight_decay -> weight_decay_end: cosine weight-decay schedule.
    figure_dir / figure_every_n_epochs: reconstruction figures (input / masked / prediction), also logged to
        W&B.
    """

    needs = ("hierarchy", "images")

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
        start_lr: float,
        min_lr: float,
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
        widths = [decoder_width // 2**i for i in range(UPSAMPLINGS + 1)]
        levels = [round(math.log2(DOWNSAMPLE // s)) for s in backbone.strides]  # decoder block of each map
        self.densify = nn.ModuleList(
            Densify(c, widths[i], 1 if i == 0 else 3, densify_norm)
            for i, c in reversed(list(zip(levels, backbone.channels)))
        )  # deepest first
        self.decoder = nn.ModuleList(UpsampleBlock(widths[i], widths[i + 1]) for i in range(UPSAMPLINGS))
        self.to_pixels = nn.Conv2d(widths[-1], 3, kernel_size=1)

    def encode(self, images: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
        """Hierarchical features of the visible cells, dense (B, C_s, H/s, W/s), zero where masked."""
        if self.hparams.sparse_backend == "minkowski":
            from greenlab.sparse import minkowski

            maps = forward_hierarchy(self.encoder, minkowski.to_sparse(images, visible))
            b, _, h, w = images.shape
            return [minkowski.to_dense(m, b, h // s, w // s) for m, s in zip(maps, self.encoder.strides)]
        return forward_hierarchy(self.encoder, images * masked_dense.mask_at(images))

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), visible (B, 1, H/32, W/32) -> (loss, prediction (B, 3, H, W))."""
        with masked_dense.active_mask(visible):
            features = self.encode(images, visible)
            densified = {
                s: d(f) for d, s, f in zip(self.densify, *map(reversed, (self.encoder.strides, features)))
            }
        x = 0
        for i, block in enumerate(self.decoder):  # stride 32 / 2^i -> 32 / 2^(i+1)
            x = block(x + densified[DOWNSAMPLE >> i] if DOWNSAMPLE >> i in densified else x)
        prediction = self.to_pixels(x)
        return masked_patch_loss(prediction, images, visible), prediction

    def training_step(self, batch, batch_idx):
        images = batch[0]
        grid = (images.shape[-2] // DOWNSAMPLE, images.shape[-1] // DOWNSAMPLE)
        visible = random_visible_mask(images.shape[0], grid, self.hparams.mask_ratio, images.device)
        loss, prediction = self(images, visible)
        log_train_loss(self, loss, images.shape[0])
        if batch_idx == 0 and self._figure_due() and self.trainer.is_global_zero:
            self.save_reconstruction(images, visible, prediction)
        return loss

    def on_train_epoch_start(self) -> None:
        hp = self.hparams
        progress = min(1.0, self.current_epoch / max(1, hp.cosine_epochs))
        wd = hp.weight_decay_end + 0.5 * (hp.weight_decay - hp.weight_decay_end) * (
            1 + math.cos(math.pi * progress)
        )
        for group in self.trainer.optimizers[0].param_groups:
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd
        self.log("train/weight_decay", wd, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.base_lr * self.effective_batch_size / 256
        groups = decay_param_groups(  # SparK: mask tokens, biases and norms are never decayed
            [self.encoder, self.densify, self.decoder, self.to_pixels], hp.weight_decay, ("mask_token",)
        )
        return adamw_warmup_cosine(
            groups, lr, hp.start_lr, hp.min_lr, hp.warmup_epochs, hp.cosine_epochs, hp.betas,
            algorithm=hp.optimizer,
        )  # fmt: skip

    def run_notes(self) -> dict:
        return self.backend_choice

    def trained_backbone(self) -> nn.Module:
        """A dense copy of the encoder: the plain network (nn-MobileNet, timm's CNN) with the pre-trained weights."""
        return masked_dense.densify(copy.deepcopy(self.encoder))

    # --- reconstruction figures
    def _figure_due(self) -> bool:
        every = self.hparams.figure_every_n_epochs
        if not every:
            return False
        return self.current_epoch % every == 0 or self.current_epoch == self.trainer.max_epochs - 1

    @torch.no_grad()
    def save_reconstruction(self, images, visible, prediction, rows: int = 4) -> Path | None:
        """PNG of input / masked input / prediction (visible cells pasted back, as SparK shows it)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = min(rows, images.shape[0])
        images, visible, prediction = images[:n].float(), visible[:n], prediction[:n].float()
        mean, std = patch_statistics(patchify(images, DOWNSAMPLE))
        restored = unpatchify(
            patchify(prediction, DOWNSAMPLE) * std + mean, 3, *images.shape[-2:], DOWNSAMPLE
        )
        full = visible.repeat_interleave(DOWNSAMPLE, -2).repeat_interleave(DOWNSAMPLE, -1)
        panels = [images, images * full, torch.where(full, images, restored)]
        fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
        for r in range(n):
            for c, (title, panel) in enumerate(zip(("input", "masked", "prediction"), panels)):
                picture = panel[r].permute(1, 2, 0).cpu()
                picture = (picture - picture.min()) / (picture.max() - picture.min() + 1e-8)
                axes[r][c].imshow(picture.numpy())
                axes[r][c].axis("off")
                if r == 0:
                    axes[r][c].set_title(title)
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
