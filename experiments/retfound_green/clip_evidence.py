"""Does RETFound-Green's gradient clipping quirk change the update? Its official loop on the CPU, at tiny size.

    python experiments/retfound_green/clip_evidence.py            # 3 loops x 300 steps: 34 min on 2 busy cores
    python experiments/retfound_green/clip_evidence.py --bf16 --steps 30 --out .../clip_evidence_bf16   # bf16 autocast

The official notebook (justinengelmann/RETFound_Green, Training_and_eval_code/TokenReconstructionPretraining.ipynb,
lines 26, 140-143, 158-169 of its one code cell) keeps the corruption token as an ``nn.Parameter`` of the wrapper
outside AdamW's groups (built from ``model.model``) and steps::

    optim.zero_grad()                                   # resets the optimiser's grads only: not the token's
    with autocast(dtype=bfloat16): loss = model(imgs)
    scaler.scale(loss).backward()                       # token.grad += S * dL/dtoken (accumulates, S = 65536 ...)
    scaler.unscale_(optim)                              # the optimiser's grads / S: not the token's
    clip_grad_norm_(model.parameters(), 0.1)            # total norm includes the token's scaled, accumulated grad
    scaler.step(optim); scaler.update()                 # S x 2 after every 2,000 finite steps

greenlab (``objective.clip: student``, Lightning) clips the optimiser's (unscaled) grads alone and has no token
grad (a zero buffer). Both loops run here in lockstep on the same batches, pixel noise and masks (one seed per
step), from the same weights: ``greenlab`` and ``official`` at the GradScaler's starting scale 2^16 (steps
0-2,000 of a run) and, with the same loop, at the scale it has reached after ~20,000 steps, 2^26 (a 120-epoch
run of 586 steps an epoch doubles it 35 times, to 2^51). Model: timm
``vit_small_patch14_reg4_dinov2`` (ViT-S/14, 4 registers, random weights: no DINOv2 weights offline), depth 2,
56 px (16 patches), the official wrapper (frozen teacher, residual projector, pixel noise 0.2, token corruption
U[0, 1/3), last sample clean), AdamW lr 5e-5 (the peak), betas (0.9, 0.99), ``param_groups_weight_decay(model,
1e-4)``; batches of 8 from 64 generated fundus-like photographs (greenlab/data/embedded.py), resized to 56 px.

Writes clip_evidence.csv (per run and step) and clip_evidence.json (the summary) beside this file.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.layers import LayerScale
from timm.optim import param_groups_weight_decay
from torch import nn

from greenlab.data.embedded import generate

HERE = Path(__file__).parent
MAX_NORM, LR, BETAS, WEIGHT_DECAY, EPS = 0.1, 5e-5, (0.9, 0.99), 1e-4, 1e-8


class TokenReconstructor(nn.Module):
    """The official wrapper's forward (notebook lines 13-83), minimal: ``official_token`` = the token as an
    ``nn.Parameter`` (official), else a zero buffer (greenlab's default, no grad)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, official_token: bool):
        super().__init__()
        self.original_encoder, self.model = teacher, student
        zeros = torch.zeros(1, 1, student.embed_dim)
        if official_token:
            self.corruption_token = nn.Parameter(zeros)
        else:
            self.register_buffer("corruption_token", zeros)
        dim = student.embed_dim
        self.model.projector = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.model.ls_projector = LayerScale(dim, init_values=1e-5)

    def forward(self, imgs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(imgs) * 0.2 * imgs.std(dim=(2, 3), keepdim=True)
        noise[-1] = 0
        imgs = imgs + noise
        x = self.model.patch_embed(imgs)
        ratio = (torch.rand(x.shape[0], device=x.device, dtype=x.dtype) / 3).unsqueeze(1)
        mask = torch.rand(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype) < ratio
        mask[-1] = False
        x[mask] = self.corruption_token.to(x.dtype)
        x = self.model.norm(self.model.blocks(self.model.norm_pre(self.model._pos_embed(x))))
        x = x + self.model.ls_projector(self.model.projector(x))
        return (x - target).pow(2).mean()


class Run:
    """One training loop: ``greenlab`` (clip the optimiser's grads, no scaler, no token grad) or ``official``
    (GradScaler from ``scale``, clip every grad of the wrapper, token outside the optimiser)."""

    def __init__(
        self, name: str, teacher: nn.Module, student: nn.Module, official: bool, scale: float, bf16: bool
    ):
        self.name, self.official, self.bf16 = name, official, bf16
        torch.manual_seed(0)  # the same projector in every run
        self.model = TokenReconstructor(teacher, copy.deepcopy(student), official_token=official)
        groups = param_groups_weight_decay(self.model.model, WEIGHT_DECAY)
        self.optim = torch.optim.AdamW(groups, lr=LR, betas=BETAS, foreach=True)  # the CUDA default
        self.scaler = torch.amp.GradScaler("cpu", init_scale=scale) if official else None
        self.params = [p for g in self.optim.param_groups for p in g["params"]]
        self.start = self.flat().clone()
        self.rows: list[dict] = []

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def step(self, step: int, imgs: torch.Tensor, target: torch.Tensor) -> None:
        before = self.last if self.rows else self.start
        token = self.model.corruption_token
        carried = token.grad.norm().item() if self.official and token.grad is not None else 0.0
        self.optim.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(imgs, target)
        if self.official:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optim)
            student = grad_norm(self.params)
            token_norm = token.grad.norm().item()
            total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM).item()
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            scale, token_norm = 1.0, 0.0
            loss.backward()
            student = grad_norm(self.params)
            total = torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM).item()
            self.optim.step()
        self.last = after = self.flat()
        self.rows.append({
            "run": self.name, "step": step, "loss": loss.item(), "scale": scale,
            "total_norm": total, "clip_coef": min(1.0, MAX_NORM / (total + 1e-6)),
            "student_grad_norm": student, "token_grad_norm": token_norm, "token_grad_carried": carried,
            "update_norm": (after - before).norm().item(),
            "eps_damping": eps_damping(self.optim) if step % 25 == 24 else "",
        })  # fmt: skip


def grad_norm(params) -> float:
    return math.sqrt(sum(p.grad.float().pow(2).sum().item() for p in params if p.grad is not None))


def eps_damping(optim: torch.optim.AdamW) -> float:
    """Mean over the student's elements of sqrt(v̂) / (sqrt(v̂) + eps): 1 = Adam's update is scale-free,
    near 0 = eps dominates and shrinks the update (gradients of the order of eps after clipping)."""
    kept, count = 0.0, 0
    for group in optim.param_groups:
        for p in group["params"]:
            state = optim.state[p]
            root = (state["exp_avg_sq"] / (1 - BETAS[1] ** state["step"].item())).sqrt()
            kept += (root / (root + EPS)).sum().item()
            count += p.numel()
    return kept / count


def photographs(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) generated fundus-like photographs, resized, normalised with mean = std = 0.5."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = generate(Path(tmp), num_images=n)
        images = [Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
                  for p in sorted((folder / "images").glob("*.png"))]  # fmt: skip
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255
    return (pixels - 0.5) / 0.5


def summary(runs: list[Run]) -> dict:
    reference = runs[0]
    moved = (reference.flat() - reference.start).norm().item()
    out = {}
    for run in runs:
        rows = run.rows
        coef = np.array([r["clip_coef"] for r in rows])
        ratio = np.array([r["update_norm"] / g["update_norm"] for r, g in zip(rows, reference.rows)])
        out[run.name] = {
            "scale": rows[0]["scale"],
            "clip_coef": {"first": coef[0], "median": float(np.median(coef)), "min": float(coef.min()),
                          "max": float(coef.max()), "steps_clipped": int((coef < 1).sum())},
            "token_grad_norm_median": float(np.median([r["token_grad_norm"] for r in rows])),
            "token_grad_carried_median": float(np.median([r["token_grad_carried"] for r in rows[1:]])),
            "student_grad_norm_median": float(np.median([r["student_grad_norm"] for r in rows])),
            "update_ratio_to_greenlab": {"median": float(np.median(ratio)), "min": float(ratio.min()),
                                         "max": float(ratio.max()), "last50_median": float(np.median(ratio[-50:]))},
            "eps_damping_last": next((r["eps_damping"] for r in reversed(rows) if r["eps_damping"] != ""), None),
            "distance_moved": (run.flat() - run.start).norm().item(),
            "distance_to_greenlab_over_greenlab_moved": (run.flat() - reference.flat()).norm().item() / moved,
            "token_max_abs_at_end": run.model.corruption_token.abs().max().item(),
            "loss_first10": float(np.mean([r["loss"] for r in rows[:10]])),
            "loss_last50": float(np.mean([r["loss"] for r in rows[-50:]])),
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img", type=int, default=56)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0**16, 2.0**26])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as the official loop")
    parser.add_argument("--out", type=Path, default=HERE / "clip_evidence")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)
    vit = dict(pretrained=False, img_size=args.img, depth=args.depth, num_classes=0)
    teacher = timm.create_model("vit_small_patch14_reg4_dinov2", **vit).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    runs = [Run("greenlab", teacher, student, False, 1.0, args.bf16)]
    runs += [
        Run(f"official_2^{round(math.log2(s))}", teacher, student, True, s, args.bf16) for s in args.scales
    ]
    pool = photographs(64, args.img)
    order = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        imgs = pool[torch.randint(0, len(pool), (args.batch,), generator=order)]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            target = teacher.forward_features(imgs)
        for run in runs:
            torch.manual_seed(1000 + step)  # the same noise and masks in every run
            run.step(step, imgs, target.clone())
        if step % 50 == 49:
            print(f"step {step + 1}, {time.time() - started:.0f} s", flush=True)
    rows = [row for run in runs for row in run.rows]
    with args.out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows
        )
    result = {
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "model": "vit_small_patch14_reg4_dinov2",
                   "lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY, "max_norm": MAX_NORM,
                   "torch": torch.__version__, "timm": timm.__version__},
        "runs": summary(runs),
        "seconds": round(time.time() - started, 1),
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["runs"], indent=2), f"\n{result['seconds']} s")


if __name__ == "__main__":
    main()
