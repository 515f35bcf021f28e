"""Training steps of every objective: greenlab (Lightning Trainer + greenlab callbacks) versus a plain
PyTorch loop doing the same maths on the same batch; peak memory; on a GPU, bf16 throughput and MFU.

    python -m benchmarks.training_steps [--size paper|tiny] [--steps 20] [--only NAME ...]   (make bench)

Both paths run ``objective.training_step`` (the loop with logging switched off) with the objective's own
optimiser, on one batch already on the device (data loading excluded: see benchmarks.data_pipeline), under
bf16 autocast on a bf16 GPU and fp32 elsewhere. Time per step = (t_last - t_warm) / (steps - warm-up),
synchronised on CUDA. overhead = greenlab step time / plain step time - 1.

FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` over one plain step (fwd + bwd, matmuls and
convolutions). MFU = FLOPs per step / step time / the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).
Each case runs in its own process, so peak memory (max_memory_allocated on GPU, peak RSS on CPU) is its own.
Writes benchmarks/results/training_steps_<cpu|gpu>_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from benchmarks.common import SameBatch, StepClock, write
from greenlab.config import build as build_option
from greenlab.objectives.base import use_channels_last

DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

# name: (objective factory, batch maker) per size; paper = the papers' input sizes and batch sizes.
CASES = {
    "token_reconstruction": {"paper": {"img": 392, "batch": 128}, "tiny": {"img": 56, "batch": 8}},
    "spark": {"paper": {"img": 224, "batch": 128}, "tiny": {"img": 64, "batch": 4}},
    "mae": {"paper": {"img": 224, "batch": 128}, "tiny": {"img": 64, "batch": 8}},
    "greenrfm_stage1": {"paper": {"crop": (192, 192, 96), "batch": 10, "stem": 2}, "tiny": {"crop": (32, 32, 16), "batch": 4, "stem": 2}},
    "greenrfm_stage2": {"paper": {"crop": (192, 192, 96), "batch": 10, "stem": 2}, "tiny": {"crop": (32, 32, 16), "batch": 4, "stem": 2}},
    "greenrfm_lite_stage1": {"paper": {"crop": (192, 192, 96), "batch": 10, "stem": 4}, "tiny": {"crop": (32, 32, 16), "batch": 4, "stem": 4}},
    "greenrfm_lite_stage2": {"paper": {"crop": (192, 192, 96), "batch": 10, "stem": 4}, "tiny": {"crop": (32, 32, 16), "batch": 4, "stem": 4}},
}  # fmt: skip


def build(name: str, size: str, device: torch.device):
    """(objective on device, batch on device, description)."""
    spec = CASES[name][size]
    torch.manual_seed(0)
    if name == "token_reconstruction":
        model = "vit_small_patch14_reg4_dinov2" if size == "paper" else "vit_tiny_patch16_224"
        vit = build_option(
            "backbone/vit_small_reg4_dinov2", model_name=model, img_size=spec["img"], weights="random"
        )
        objective = build_option("objective/token_reconstruction", backbone=vit)
        batch = (torch.randn(spec["batch"], 3, spec["img"], spec["img"]),)
        return objective, batch, f"{model} at {spec['img']} px, batch {spec['batch']}"
    if name == "mae":
        model = "vit_large_patch16_224.mae" if size == "paper" else "vit_tiny_patch16_224"
        decoder = {} if size == "paper" else {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 4}
        vit = build_option(
            "backbone/vit_large_patch16_mae", model_name=model, img_size=spec["img"], weights="random"
        )
        objective = build_option("objective/mae", backbone=vit, **decoder)
        batch = (torch.randn(spec["batch"], 3, spec["img"], spec["img"]),)
        return objective, batch, f"MAE {model} at {spec['img']} px, mask 0.75, batch {spec['batch']}"
    if name == "spark":
        width = "rexnet_300" if size == "paper" else "rexnet_100"
        objective = build_option("objective/spark", backbone=build_option("backbone/nn_mobilenet", model_name=width),
                                 sparse_backend="masked_dense", figure_every_n_epochs=0,
                                 **({} if size == "paper" else {"decoder_width": 64}))  # fmt: skip
        batch = (torch.randn(spec["batch"], 3, spec["img"], spec["img"]),)
        return (
            objective,
            batch,
            f"nn-MobileNet ({width}), masked-dense, {spec['img']} px, batch {spec['batch']}",
        )
    from greenlab.data.base import Task

    text = {"hidden_size": 768, "num_layers": 12, "num_heads": 12} if size == "paper" else {}
    objective = build_option(
        "objective/must", image_encoder=build_option("backbone/resnet3d18", stem_kernel=spec["stem"]),
        text_encoder=build_option("text_encoder/random_bert", **text), stage1_epochs=1 if "stage1" in name else 0,
    )  # fmt: skip
    reports = [f"There is a small pleural effusion and a {i} mm nodule. " * 12 for i in range(spec["batch"])]
    objective.build([Task(f"finding_{i}", 2) for i in range(18)], reports)
    labels = torch.randint(-2, 2, (spec["batch"], 18))
    batch = (torch.randn(spec["batch"], 1, *spec["crop"]), reports, labels)
    bert = "BERT-base size (768 x 12)" if size == "paper" else "BERT 256 x 4"
    return (
        objective,
        batch,
        f"3D ResNet-18 stem {spec['stem']}, crop {spec['crop']}, batch {spec['batch']}, {bert} text",
    )


def to_device(batch, device):
    return tuple(x.to(device) if torch.is_tensor(x) else x for x in batch)


def run_case(name: str, size: str, steps: int, warmup: int, variants: list[str]) -> dict:
    import lightning as L

    from greenlab.compute.energy import peak_host_memory_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    objective, batch, what = build(name, size, device)
    batch = to_device(batch, device)
    batch_size = len(batch[-1]) if name.startswith("greenrfm") else len(batch[0])
    objective.effective_batch_size = batch_size  # the lr rules' global batch: one process, no accumulation
    clip = 0.5 if name.endswith("stage2") else None  # MUST stage 2 clips gradients itself (greenlab does too)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # plain loop: the same training_step maths, the objective's optimiser, autocast like Lightning's bf16-mixed
    objective.to(device).train()
    objective.log = objective.log_dict = lambda *a, **k: None
    optimizer = objective.configure_optimizers()["optimizer"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    stamps = []
    for step in range(steps):
        with counter if step == 1 else nullcontext():
            with autocast:
                loss = objective.training_step(batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), clip)
            optimizer.step()
        sync()
        stamps.append(time.perf_counter())
    plain = (stamps[-1] - stamps[warmup]) / (steps - 1 - warmup)
    flops = counter.get_total_flops()
    peak_plain = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_host_memory_bytes()
    del optimizer

    # greenlab: a fresh objective of the same weights through Lightning with greenlab's compute monitor; then,
    # with --variants, the same with compile: true / channels_last: true (greenlab/pipeline/run.py applies them alike)
    def through_lightning(variant: str) -> float:
        objective, _, _ = build(name, size, device)
        objective.effective_batch_size = batch_size
        if variant == "compiled":
            objective.compile_networks()
        elif variant == "channels_last":
            use_channels_last(objective)
        stamp = StepClock()
        monitor = build_option("callbacks/default", select="compute_monitor")
        monitor.budget = build_option("compute/default")
        trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=steps, max_epochs=1,
                            precision="bf16-mixed" if bf16 else "32-true", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[monitor, stamp])  # fmt: skip
        # no datamodule: the global batch is set above; MUST's heads (built from the data in setup) too
        objective.setup = lambda stage: None
        trainer.fit(objective, train_dataloaders=SameBatch(batch, steps))
        return stamp.seconds_per_step(warmup)

    framework = through_lightning("eager")
    variant_seconds = {v: through_lightning(v) for v in variants}
    result = {
        "case": name,
        "what": what,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if bf16 else "fp32",
        "batch": batch_size,
        "steps_timed": steps - 1 - warmup,
        "plain_step_seconds": plain,
        "greenlab_step_seconds": framework,
        "overhead": framework / plain - 1,
        "images_per_second_plain": batch_size / plain,
        "images_per_second_greenlab": batch_size / framework,
        "flops_per_step": flops,
        "flops_per_image": flops / batch_size,
        "peak_memory_bytes_plain_loop": peak_plain,
        "peak_memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
        **{f"greenlab_{v}_step_seconds": t for v, t in variant_seconds.items()},
        **{f"speedup_{v}": framework / t for v, t in variant_seconds.items()},
    }
    if device.type == "cuda":
        peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in torch.cuda.get_device_name()), None)
        result["peak_flops_assumed"] = peak
        result["mfu_plain"] = flops / plain / peak if peak and bf16 else None
        result["mfu_greenlab"] = flops / framework / peak if peak and bf16 else None
        for v, t in variant_seconds.items():
            result[f"mfu_greenlab_{v}"] = flops / t / peak if peak and bf16 else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["paper", "tiny"], help="default: paper on a GPU, tiny on a CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=list(CASES))
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=["compiled", "channels_last"],
        help="also time greenlab with compile: true / channels_last: true (warm-up covers compiling)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    args.size = args.size or ("paper" if torch.cuda.is_available() else "tiny")
    if args.case:
        print(json.dumps(run_case(args.case, args.size, args.steps, args.warmup, args.variants)))
        return

    results = []
    for name in args.only:
        command = [sys.executable, "-m", "benchmarks.training_steps", "--case", name, "--size", args.size,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--variants", *args.variants]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            results.append({"case": name, "error": done.stderr.strip().splitlines()[-1]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    suffix = "".join(f"_{v}" for v in args.variants)
    path = write(
        f"training_steps_{kind}_{args.size}{suffix}", {"command": " ".join(sys.argv), "results": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
