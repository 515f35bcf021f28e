"""RETFound-Green Token Reconstruction (Engelmann & Bernabeu, arXiv 2405.00117).

A frozen *teacher* (the initial backbone, never updated, never saved) embeds the clean image. A trainable
*student*, starting from the same weights, sees a corrupted copy of the same augmented view and must
reproduce the teacher's output tokens through a small residual prediction head::

    x̃   = x + ε,  ε ~ N(0, (s · std_c(x))²)          pixel noise, std_c = the image's own per-channel std
    z   = PatchEmbed(x̃);  z_i ← c  with prob. r_b    token corruption, r_b ~ U[0, r_max) per image,
                                                     c the corruption token: zeros, never trained (the
                                                     official code; ``corruption_token=learned`` an option);
                                                     the last image of each batch stays clean (no noise,
                                                     r_b = 0)
    ŷ   = h(ViT_student(z)),  h(t) = t + γ ⊙ MLP(t)   MLP = LN → Linear → GELU → Linear, γ init 1e-5
    y   = ViT_teacher(x)                             final-LayerNorm output, [CLS] + registers + patches
    L   = mean_{tokens, dims} (ŷ - y)²               (distance and token subset configurable)

Clipping (``clip``), the official loop (TokenReconstructionPretraining.ipynb): bf16 autocast with a GradScaler
of scale S (2^16, x 2 after every 2,000 finite steps), the token an ``nn.Parameter`` outside AdamW, then
``clip_grad_norm_(model.parameters(), 0.1)``. The token's gradient is never zeroed nor unscaled, so with
g_t = dL_t/dc and G_t the token's gradient after step t's clipping, and s_t the student's unscaled gradient::

    G'_t = G_{t-1} + S_t g_t                         accumulated, scaled (clip=official reproduces this)
    k_t  = min(1, 0.1 / (sqrt(|s_t|² + |G'_t|²) + 1e-6)),   s_t ← k_t s_t,   G_t = k_t G'_t

|G'_t| ≈ S_t |g_t| dwarfs |s_t|, so k_t ≈ 0.1 / (S_t |g_t|): the clipped student gradient falls below AdamW's
eps (1e-8) an element and the update shrinks, more with every doubling of S (measured at tiny size:
experiments/retfound_green/README.md, clip_evidence.py). ``clip=student``: k_t = min(1, 0.1 / |s_t|), greenlab's (Lightning's clipping of the
optimiser's gradients).

Shapes: images (B, 3, H, W); tokens (B, T, D), T = 1 + 4 + (H/14)(W/14) = 789 at 392 px, D = 384.

On a CNN, 2D or 3D (greenlab's extension; the ViT path above is the paper's): the corruption acts on the
*stem output grid*, the CNN's analogue of the patch embedding, and the tokens are the final feature map's
positions::

    s   = Stem(x̃)                                    (B, C_s, H/r, W/r) (3D: (B, C_s, D/r, H/r, W/r)): the
                                                     module ``stem_name`` (timm's ``stem``, ResNet's
                                                     conv1-bn1-ReLU, r3d_18's strided conv-BN-ReLU)
    s[:, :, i, j] ← c  with prob. r_b                per stem cell, r_b as above, c ∈ R^{C_s} zeros
    ŷ   = h(flatten(Rest(s)))                        (B, T, C): forward_features' map, T its positions
    y   = flatten(CNN_teacher(x))                    row-major, no prefix tokens; noise std per volume
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import nn

from greenlab.backbones.hierarchy import probe_stem, spatial_dims
from greenlab.contracts import require_fit
from greenlab.objectives.base import PretrainingModule
from greenlab.objectives.optim import adamw_warmup_cosine, decay_param_groups, log_train_loss


class ResidualPredictionHead(nn.Module):
    """t + γ ⊙ MLP(t): starts as the identity (γ = 1e-5), used during pre-training only."""

    def __init__(self, dim: int, layer_scale_init: float = 1e-5):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.scale = LayerScale(dim, init_values=layer_scale_init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.scale(self.mlp(tokens))


class TokenReconstruction(PretrainingModule):
    """Token Reconstruction pre-training of a timm ViT, or of a CNN (see the module docstring).

    Args:
        backbone: timm ``VisionTransformer`` with ``num_classes=0``, or a CNN with a stem (``stem_name``:
            nn-MobileNet, any timm CNN); becomes the student, a frozen copy the teacher.
        noise_std: pixel noise std as a fraction of each image's per-channel std (paper 0.2; 0 disables).
        max_corruption_ratio: per-image token-corruption ratio is drawn from U[0, this) (paper 1/3; 0 disables).
        target_tokens: ``all`` (paper), ``patch`` (patch tokens only) or ``prefix`` ([CLS] + registers; a
            CNN has none: its tokens are all "patch").
        distance: ``mse`` (paper), ``smooth_l1`` or ``cosine`` (1 - cosine similarity per token).
        corruption_token: ``zeros`` (official: zeros, never trained) or ``learned`` (greenlab: trained, N(0, 0.02)).
        clip: ``official`` (the official GradScaler loop's clipping, above; needs ``corruption_token=zeros``) or
            ``student`` (clip the optimiser's gradients alone); the max norm is ``trainer.gradient_clip_val``.
        lr, betas, weight_decay: AdamW; weight decay skips biases and norms (1-D tensors; timm
            ``param_groups_weight_decay`` without a skip list, as the official notebook: the [CLS], register
            and position tokens are decayed).
        warmup_epochs, cosine_epochs, start_lr, min_lr: per-epoch schedule, see ``warmup_cosine_factor``.
    """

    needs = (("tokens", "feature_map"),)  # a ViT takes images; a CNN images or volumes

    def __init__(
        self,
        backbone: nn.Module,
        noise_std: float,
        max_corruption_ratio: float,
        corruption_token: str,
        clip: str,
        target_tokens: str,
        distance: str,
        head_layer_scale_init: float,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        warmup_epochs: int,
        cosine_epochs: int,
        cosine_from_zero: bool,
        start_lr: float,
        min_lr: float,
    ):
        super().__init__()
        require_fit(self, backbone)
        if target_tokens not in ("all", "patch", "prefix"):
            raise ValueError(f"target_tokens must be all, patch or prefix, not {target_tokens!r}")
        if corruption_token not in ("zeros", "learned"):
            raise ValueError(f"corruption_token must be zeros or learned, not {corruption_token!r}")
        if clip not in ("official", "student"):
            raise ValueError(f"clip must be official or student, not {clip!r}")
        if clip == "official" and corruption_token == "learned":
            raise ValueError(
                "clip=official reproduces the official token (zeros, outside the optimiser): use "
                "corruption_token=zeros, or clip=student with a learned token"
            )
        if distance not in ("mse", "smooth_l1", "cosine"):
            raise ValueError(f"distance must be mse, smooth_l1 or cosine, not {distance!r}")
        self.is_vit = hasattr(backbone, "patch_embed")
        if not self.is_vit and target_tokens == "prefix":
            raise ValueError(
                f"target_tokens=prefix: {type(backbone).__name__} is a CNN, it has no prefix tokens"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.student = backbone
        self.teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
        dim = backbone.embed_dim if self.is_vit else backbone.num_features
        self.input_ndim = spatial_dims(backbone) + 2
        self.stem_stride = 1
        corruption_dim = dim
        if not self.is_vit:
            corruption_dim, self.stem_stride = probe_stem(backbone)
        if corruption_token == "learned":
            self.corruption_token = nn.Parameter(torch.zeros(corruption_dim))
            nn.init.normal_(self.corruption_token, std=0.02)
        elif clip == "official" and max_corruption_ratio > 0:
            # the official nn.Parameter: it has a gradient, and sits outside every parameter group
            self.corruption_token = nn.Parameter(torch.zeros(corruption_dim))
        else:  # outside every parameter group: all zeros for the whole run (no corruption: never in the graph)
            self.register_buffer("corruption_token", torch.zeros(corruption_dim), persistent=False)
        self.head = ResidualPredictionHead(dim, head_layer_scale_init)
        self.scaler: torch.amp.GradScaler | None = None  # clip=official: made on the loss's device
        self.restored: dict | None = None  # clip=official: the scaler and token gradient of a checkpoint
        self.last_clip: dict = {}  # clip=official: the latest step's coefficient, norms and scale

    # --- the teacher is a fixed function of the initial weights: always eval, never trained, never saved
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
        }
        if self.hparams.clip == "official" and self.scaler is not None:  # a resumed run: the same loop
            grad = self.corruption_token.grad
            checkpoint["official_clip"] = {
                "scaler": self.scaler.state_dict(),
                "token_grad": None if grad is None else grad.detach().cpu().clone(),
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        self.restored = checkpoint.get("official_clip")

    # --- corruption
    def add_pixel_noise(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, *spatial) + Gaussian noise of std ``noise_std`` x each image's (volume's) per-channel
        std; the last image of the batch is left clean."""
        if self.hparams.noise_std == 0:
            return images
        channel_std = images.std(dim=tuple(range(2, images.ndim)), keepdim=True)
        noise = torch.randn_like(images) * channel_std * self.hparams.noise_std
        noise[-1] = 0.0
        return images + noise

    def corruption_mask(self, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
        """(B, N) bool, True = replace the patch token; ratio ~ U[0, max) per image, last image clean."""
        ratios = torch.rand(batch, 1, device=device) * self.hparams.max_corruption_ratio
        ratios[-1] = 0.0
        return torch.rand(batch, num_patches, device=device) < ratios

    def corruption_cells(self, images: torch.Tensor) -> int:
        """N, the cells that corruption acts on: a ViT's patches, or a CNN's stem output positions."""
        if self.is_vit:
            return self.student.patch_embed.num_patches
        return math.prod(n // self.stem_stride for n in images.shape[2:])

    def student_tokens(self, images: torch.Tensor, corrupt: torch.Tensor | None = None) -> torch.Tensor:
        """The student's tokens with the cells where ``corrupt`` (B, N) is True replaced by the corruption
        token: (B, T, D).

        ViT: mirrors timm ``VisionTransformer.forward_features``; the corruption sits after the patch embedding
        and before the position embedding, so a corrupted token keeps its position. CNN: the stem's output
        positions (row-major) are replaced, by a forward hook; the tokens are the final map's positions.
        """
        if not self.is_vit:
            return self.cnn_tokens(self.student, images, corrupt)
        vit = self.student
        x = vit.patch_embed(images)  # (B, N, D), or (B, h, w, D) with dynamic_img_size
        if corrupt is not None:
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            flat = torch.where(corrupt.unsqueeze(-1), self.corruption_token.to(flat.dtype), flat)
            x = flat.reshape(x.shape)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def cnn_tokens(self, cnn: nn.Module, images: torch.Tensor, corrupt: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) positions of ``cnn.forward_features``, the stem's output cells replaced where ``corrupt``."""

        def replace_cells(module, inputs, output):
            b, _, *grid = output.shape
            if corrupt.shape[1] != math.prod(grid):
                raise ValueError(
                    f"the corruption mask has {corrupt.shape[1]} cells; the stem's grid is {grid}"
                )
            token = self.corruption_token.to(output.dtype).view(1, -1, *[1] * len(grid))
            return torch.where(corrupt.view(b, 1, *grid), token, output)

        handle = None
        if corrupt is not None:
            handle = cnn.get_submodule(cnn.stem_name).register_forward_hook(replace_cells)
        try:
            maps = cnn.forward_features(images)
        finally:
            if handle is not None:
                handle.remove()
        return maps.flatten(2).transpose(1, 2)

    def select_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        prefix = self.student.num_prefix_tokens if self.is_vit else 0
        if self.hparams.target_tokens == "patch":
            return tokens[:, prefix:]
        if self.hparams.target_tokens == "prefix":
            return tokens[:, :prefix]
        return tokens

    def token_distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.distance == "mse":
            return F.mse_loss(prediction, target)
        if self.hparams.distance == "smooth_l1":
            return F.smooth_l1_loss(prediction, target)
        return (1 - F.cosine_similarity(prediction, target, dim=-1)).mean()

    # --- the objective
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Token Reconstruction loss (scalar) of a batch of clean, augmented images (B, 3, H, W)."""
        if images.ndim != self.input_ndim:
            kind = "2D images (B, C, H, W)" if self.input_ndim == 4 else "3D volumes (B, C, D, H, W)"
            raise ValueError(
                f"Token Reconstruction on {type(self.student).__name__} takes {kind}; the data gives "
                f"{tuple(images.shape)} (a MedMNIST file of the other kind? or another backbone)"
            )
        with torch.no_grad():
            target = (
                self.teacher.forward_features(images)
                if self.is_vit
                else self.cnn_tokens(self.teacher, images, None)
            )
        corrupt = None
        if self.hparams.max_corruption_ratio > 0:
            corrupt = self.corruption_mask(images.shape[0], self.corruption_cells(images), images.device)
        prediction = self.head(self.student_tokens(self.add_pixel_noise(images), corrupt))
        return self.token_distance(self.select_tokens(prediction).float(), self.select_tokens(target).float())

    def training_step(self, batch, batch_idx):
        images = batch[0]
        loss = self(images)
        log_train_loss(self, loss, images.shape[0])
        return loss

    # --- clip=official: the official GradScaler loop inside Lightning's step (see the module docstring)
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.clip == "official" and str(self.trainer.precision).startswith("16"):
            raise ValueError(
                "objective.clip=official emulates the official loop's own GradScaler (bf16 autocast); "
                f"trainer.precision={self.trainer.precision} brings Lightning's: use bf16-mixed or 32-true, "
                "or objective.clip=student"
            )

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """clip=official: ``scaler.scale(loss).backward()``; the token's gradient adds to the one it kept."""
        if self.hparams.clip == "official":
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(loss.device.type)  # torch's defaults, as the notebook's
                restored, self.restored = self.restored, None
                if restored:
                    self.scaler.load_state_dict(restored["scaler"])
                    token, grad = self.corruption_token, restored["token_grad"]
                    token.grad = None if grad is None else grad.to(token.device)
            loss = self.scaler.scale(loss)
        super().backward(loss, *args, **kwargs)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """clip=official: ``scaler.unscale_(optim)`` (the optimiser's gradients only), ``clip_grad_norm_`` over
        every parameter (the student's, the head's and the token's scaled, accumulated gradient), the step
        skipped on a non-finite gradient (``scaler.step``), then ``scaler.update()``."""
        if self.hparams.clip != "official":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        student = torch.nn.utils.get_total_norm([p.grad for p in params])
        token = self.corruption_token.grad
        record = {"loss_scale": self.scaler.get_scale(), "student_grad_norm": student.item(),
                  "token_grad_norm": 0.0 if token is None else token.norm().item(), "clip_coef": 1.0}  # fmt: skip
        if gradient_clip_val:
            total = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            record["clip_coef"] = min(1.0, gradient_clip_val / (total.item() + 1e-6))
        if not torch.isfinite(student):  # GradScaler.step skips the step: AdamW skips grads of None
            for p in params:
                p.grad = None
        self.scaler.update()
        self.last_clip = record
        if self._trainer is not None:
            self.log_dict({f"train/{k}": v for k, v in record.items()}, on_step=True, on_epoch=False)

    def run_notes(self) -> dict:
        return {"clip": {"mode": "official", **self.last_clip}} if self.hparams.clip == "official" else {}

    def configure_optimizers(self):
        """AdamW over the student and the head, groups as timm ``param_groups_weight_decay`` (the official
        notebook's, without a skip list); a learned token undecayed."""
        hp = self.hparams
        groups = decay_param_groups([self.student, self.head], hp.weight_decay, model_skip_list=False)
        if hp.corruption_token == "learned":  # the official token (clip=official) stays outside
            groups[1]["params"].append(self.corruption_token)
        return adamw_warmup_cosine(
            groups, hp.lr, hp.start_lr, hp.min_lr, hp.warmup_epochs, hp.cosine_epochs, hp.betas,
            cosine_from_zero=hp.cosine_from_zero,
        )  # fmt: skip

    def trained_backbone(self) -> nn.Module:
        """The student network alone (no head, no corruption token): what downstream tasks load."""
        return self.student
