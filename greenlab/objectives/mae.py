"""Masked autoencoder (He et al. 2022), the objective of RETFound-MEH: the efficiency study's baseline.

A random ``mask_ratio`` of the patches is dropped per image; the ViT encoder sees only the visible ones
(position embeddings added first, the prefix tokens kept); a light decoder gets the encoded tokens plus a
shared mask token at each dropped position and predicts the pixels of every patch::

    P      = patchify(x)                              (B, N, p·p·C), N = (H/p)(W/p)
    keep   = N (1 - r) random patches per image       r = mask_ratio (0.75)
    z      = ViT(prefix + (PatchEmbed(x) + pos)[keep])
    ŷ      = Dec(unshuffle(Linear(z) ∪ mask tokens) + pos_dec)     (B, N, p·p·C)
    target = (P - mean(P)) / sqrt(var(P) + 1e-6)      per patch (norm_pix_loss; else P)
    L      = Σ_masked mean_pixels (ŷ - target)² / #masked

Decoder: ``decoder_depth`` transformer blocks of ``decoder_dim`` (8 x 512, 16 heads). As the official MAE code
(facebookresearch/mae, also RETFound_MAE): fixed 2D sin-cos position embeddings in encoder and decoder (never
trained; [CLS] row zero), xavier-uniform linear layers, LayerNorm eps 1e-6.

Any timm ViT with a position table: the prefix (MAE's one [CLS]; also DINOv2's [CLS] + registers, or none) is
never masked and has the positions timm gives it: its rows of the table (zero under MAE's init) when the
table has them, none under ``no_embed_class`` (the table covers the patches only); in the decoder the prefix
has no position, as MAE's zero [CLS] row. A new encoder's registers start as its [CLS] does, N(0, 0.02).

Values: shared/REFERENCE.md §1 (DERETFound / RETFound-MEH: ViT-L/16, 224 px, mask 0.75, norm-pix loss, AdamW
blr 1.5e-4 x batch / 256, betas (0.9, 0.95), wd 0.05).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from greenlab.contracts import require_fit
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import (
    adamw_warmup_cosine,
    decay_param_groups,
    iterations_per_epoch,
    log_train_loss,
)
from greenlab.objectives.patches import masked_patch_mse, normalised_patches, patchify


def mae_sincos_pos_embed(dim: int, grid: tuple[int, ...]) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position embedding (``get_2d_sincos_pos_embed``): (h·w, dim), patches row-major;
    the first dim/2 channels encode the column, the last dim/2 the row, each as [sin | cos] of
    position x 1/10000^(k / (dim/4)). In 3D MONAI's extension of it (``build_sincos_position_embedding``,
    from SelfMedMAE): dim/3 channels each for the second, first and third axis, frequencies over dim/6."""
    parts = 2 * len(grid)
    if dim % parts:
        raise ValueError(
            f"a {len(grid)}D sin-cos position embedding needs a width divisible by {parts}, not {dim}"
        )
    omega = 1.0 / 10000 ** (torch.arange(dim // parts, dtype=torch.float64) / (dim // parts))
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    order = (1, 0, *range(2, len(grid)))  # column, row (, depth)
    return torch.cat([encode(axes[a]) for a in order], dim=1).float()


def mae_init(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform linear weights, zero biases; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskedAutoencoder(PretrainingModule):
    """MAE pre-training of a timm ViT with a position table (any prefix layout, see the module docstring).

    Args:
        backbone: timm ``VisionTransformer`` (``num_classes=0``): the encoder downstream tasks keep.
        mask_ratio: fraction of patches hidden from the encoder.
        decoder_dim, decoder_depth, decoder_heads: the pre-training-only decoder.
        norm_pix_loss: regress per-patch normalised pixels (MAE's best setting).
        base_lr: lr = base_lr x the global batch / 256 (MAE's rule: processes x accumulation x per-process
            batch, ``effective_batch_size``); betas, weight_decay: AdamW.
        warmup_epochs, cosine_epochs, min_lr: MAE's per-iteration schedule (util/lr_sched.py: linear from 0,
            then cosine), see ``warmup_cosine_factor``.
    """

    needs = ("tokens", "position_table")  # 2D images, or volumes with a 3D patch embedding

    def __init__(self, backbone: nn.Module, mask_ratio: float, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, norm_pix_loss: bool, base_lr: float,
                 betas: tuple[float, float], weight_decay: float, warmup_epochs: int, cosine_epochs: int,
                 min_lr: float):  # fmt: skip
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), not {mask_ratio}")
        require_fit(self, backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.encoder = backbone
        patch = backbone.patch_embed.patch_size
        grid = backbone.patch_embed.grid_size
        self.patch_size = patch[0]
        self.num_prefix = backbone.num_prefix_tokens
        self.prefix_rows = 0 if backbone.no_embed_class else self.num_prefix  # the prefix's rows of the table
        if backbone.init_record["used"] == "random":  # MAE's own initialisation of a new encoder
            backbone.apply(mae_init)
            nn.init.xavier_uniform_(backbone.patch_embed.proj.weight.view(backbone.embed_dim, -1))
            for token in self.prefix_parameters():
                nn.init.normal_(token, std=0.02)
            with torch.no_grad():
                backbone.pos_embed[0, self.prefix_rows :] = mae_sincos_pos_embed(
                    backbone.embed_dim, tuple(grid)
                )
                backbone.pos_embed[0, : self.prefix_rows] = 0.0
        backbone.pos_embed.requires_grad_(False)  # fixed sin-cos, as MAE's encoder
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", mae_sincos_pos_embed(decoder_dim, tuple(grid))[None],
                             persistent=False)  # fmt: skip
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *(Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
              for _ in range(decoder_depth))
        )  # fmt: skip
        self.decoder_norm = norm(decoder_dim)
        in_chans = backbone.patch_embed.proj.in_channels
        self.decoder_pred = nn.Linear(decoder_dim, math.prod(patch) * in_chans)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            part.apply(mae_init)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_masking(self, batch: int, num_patches: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep (B, K) indices of the visible patches, mask (B, N) with 1 = hidden)."""
        keep_count = int(round(num_patches * (1 - self.hparams.mask_ratio)))
        order = torch.rand(batch, num_patches, device=device).argsort(dim=1)
        keep = order[:, :keep_count]
        mask = torch.ones(batch, num_patches, device=device)
        mask.scatter_(1, keep, 0.0)
        return keep, mask

    def prefix_parameters(self) -> list[nn.Parameter]:
        """The encoder's prefix tokens in timm's order: [CLS], then the registers (those it has)."""
        return [t for t in (self.encoder.cls_token, self.encoder.reg_token) if t is not None]

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The prefix + the visible patch tokens through the encoder: (B, P + K, D), P = num_prefix_tokens.
        With every patch kept in order, timm's ``forward_features``."""
        vit = self.encoder
        x = vit.patch_embed(images) + vit.pos_embed[:, self.prefix_rows :]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.num_prefix:
            prefix = torch.cat(self.prefix_parameters(), dim=1)
            if self.prefix_rows:
                prefix = prefix + vit.pos_embed[:, : self.prefix_rows]
            x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        x = vit.norm_pre(x)
        return vit.norm(vit.blocks(x))

    def decode(self, latent: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Encoded (B, P + K, D) -> pixel predictions for every patch (B, N, p·p·C)."""
        x = self.decoder_embed(latent)
        b, dim, p = x.shape[0], x.shape[-1], self.num_prefix
        full = self.mask_token.to(x.dtype).expand(b, num_patches, dim).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, dim), x[:, p:])
        x = torch.cat([x[:, :p], full + self.decoder_pos_embed.to(x.dtype)], dim=1)
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, p:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """MAE loss (scalar) of a batch of images (B, C, H, W)."""
        expected = self.encoder.patch_embed.proj.weight.ndim  # 4: images (B, C, H, W); 5: volumes
        if images.ndim != expected:
            kind = "2D images (B, C, H, W)" if expected == 4 else "3D volumes (B, C, X, Y, Z)"
            raise ValueError(
                f"MAE on {type(self.encoder).__name__} takes {kind}; the data gives {tuple(images.shape)}"
            )
        target = patchify(images, self.patch_size).float()
        if self.hparams.norm_pix_loss:
            target = normalised_patches(target)
        keep, mask = self.random_masking(images.shape[0], target.shape[1], images.device)
        prediction = self.decode(self.encode_visible(images, keep), keep, target.shape[1]).float()
        return masked_patch_mse(prediction, target, mask)

    def training_step(self, batch, batch_idx):
        loss = self(batch[0])  # (images, labels): the labels are not used
        log_train_loss(self, loss, len(batch[0]))
        return loss

    def configure_optimizers(self):
        """AdamW over MAE's groups (main_pretrain.py: timm 0.3.2 ``add_weight_decay`` without a skip list: 1-D
        parameters and biases undecayed, the class and mask tokens decayed; positions are fixed), the lr set
        every iteration (engine_pretrain.py: ``adjust_learning_rate`` at ``data_iter_step / len + epoch``)."""
        hp = self.hparams
        lr = hp.base_lr * self.effective_batch_size / 256
        groups = decay_param_groups([self.encoder, self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                                     self.decoder_pred], hp.weight_decay, model_skip_list=False)  # fmt: skip
        groups[0]["params"].append(self.mask_token)
        return adamw_warmup_cosine(groups, lr, 0.0, hp.min_lr, hp.warmup_epochs, hp.cosine_epochs, hp.betas,
                                   steps_per_epoch=iterations_per_epoch(self))  # fmt: skip

    def trained_backbone(self) -> nn.Module:
        """The encoder ViT alone (no decoder): what downstream tasks load."""
        return self.encoder
