"""The GPU check (``make bench-gpu``): one script, under 10 minutes on one GPU, whose figures go to
benchmarks/results/*_gpu*.json and the table in benchmarks/README.md.

    python -m benchmarks.gpu_check [--dry-run] [--only STEP ...]

Steps, each in its own process with its own time limit (``STEPS``; a step that fails or runs out of time is
recorded with its exit status and the last lines of its output, and the others still run):

- ``ddp``: the README's DDP command (``trainer=ddp``) with one device, the main experiment at its demo size;
- ``training_steps``: every objective's training step, eager and ``compile=true``, with MFU and peak memory
  (GreenRFM and GreenRFM-lite at batch 10, the paper's);
- ``loader_ratio_device`` / ``loader_ratio_workers``: training with the real loader over training with one
  repeated batch at paper scale (1,000 generated 1024-px photographs through the preprocessing cache), with
  ``data.augment_on=device`` and with ``workers``;
- ``augment_on``: the loader's shares with the augmentations in the workers vs on the GPU (CUDA ms per image);
- ``augment_parity``: the device augmentation against the workers' PIL output under one seed, on the GPU
  (tests/test_device_augment.py);
- ``spark_profile``: SparK's real-loader profile;
- ``energy``: NVML energy next to codecarbon over the same work;
- ``minkowski_cuda``: a MinkowskiEngine 0.5.4 build with CUDA (the exact error when it fails).

``--dry-run``: every step at a tiny size on the CPU (the suite runs it: tests/test_gpu_check.py), so that the
script is known to run end to end before a GPU is lent. Writes benchmarks/results/gpu_check_<gpu|dry_run>.json
(what ran, exit status, seconds, the result files each step wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks.common import results_folder, write

PYTHON = sys.executable
RUN = [PYTHON, "-m", "greenlab", "+experiment=retfound_green"]
TINY_RUN = ["img_size=28", "+backbone.model_kwargs.embed_dim=48", "+backbone.model_kwargs.depth=2",
            "+backbone.model_kwargs.num_heads=2", "data.num_images=16", "data.batch_size=8", "data.num_workers=0",
            "trainer.max_epochs=1", "evaluation.bootstrap_resamples=10", "evaluation.ci_resamples=10"]  # fmt: skip


@dataclass(frozen=True)
class Step:
    """A command on the GPU and its tiny twin for ``--dry-run``; ``seconds``: its time limit on the GPU."""

    name: str
    gpu: list[str]
    dry_run: list[str]
    seconds: int


def steps(workdir: str) -> list[Step]:
    """The check's steps: their GPU limits add up to 500 s, and the MinkowskiEngine build has the rest of the 570 s."""
    nproc = str(os.cpu_count() or 1)
    loader = [PYTHON, "-m", "benchmarks.data_pipeline", "--data-dir", workdir, "--only", "retfound_green"]
    mink = [PYTHON, "-m", "benchmarks.gpu_check", "--minkowski-build", workdir]
    return [
        Step("ddp", [*RUN, "trainer=ddp", "trainer.devices=1", f"hydra.run.dir={workdir}/ddp"],
             [*RUN, *TINY_RUN, "trainer=ddp", "trainer.devices=1", "trainer.accelerator=cpu", "data.augment_on=device",
              f"paths.data_dir={workdir}/data", f"hydra.run.dir={workdir}/ddp"], 75),
        Step("training_steps", [PYTHON, "-m", "benchmarks.training_steps", "--steps", "15", "--warmup", "5",
                                "--variants", "compiled"],
             [PYTHON, "-m", "benchmarks.training_steps", "--size", "tiny", "--steps", "2", "--warmup", "1",
              "--only", "token_reconstruction"], 170),
        Step("loader_ratio_device", [*loader, "sparse_cnn_mae", "--steps", "15", "--warmup", "5", "--paper-photos", "1000",
                                     f"data.num_workers={nproc}", "data.augment_on=device"],
             [*loader, "--steps", "3", "--warmup", "1", *TINY_RUN[:4], "data.num_images=16", "data.batch_size=4",
              "data.num_workers=0", "data.augment_on=device"], 60),
        Step("loader_ratio_workers", [*loader, "sparse_cnn_mae", "--steps", "15", "--warmup", "5", "--paper-photos", "1000",
                                      f"data.num_workers={nproc}", "data.augment_on=workers"],
             [*loader, "--steps", "3", "--warmup", "1", *TINY_RUN[:4], "data.num_images=16", "data.batch_size=4",
              "data.num_workers=0", "data.augment_on=workers"], 50),
        Step("augment_on", [PYTHON, "-m", "benchmarks.loader_cache", "--only-augment-on", "--images", "512"],
             [PYTHON, "-m", "benchmarks.loader_cache", "--only-augment-on", "--images", "8", "--batch", "4",
              "--device-images", "4", "--img", "64", "--cache-side", "96"], 40),
        Step("augment_parity", [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device_augment.py",
                                "-k", "one_seed or mixed_sizes"],
             [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device_augment.py", "-k",
              "mixed_sizes"], 25),
        Step("spark_profile", [PYTHON, "-m", "benchmarks.spark_profile", "--steps", "30", "--data-dir", workdir],
             [PYTHON, "-m", "benchmarks.spark_profile", "--steps", "2", "--data-dir", workdir, "img_size=64",
              "backbone.model_name=rexnet_100", "objective.decoder_width=32", "data.num_images=16",
              "data.batch_size=4", "data.num_workers=0", "data.augment_on=device"], 45),
        Step("energy", [PYTHON, "-m", "benchmarks.energy_backends", "--seconds", "20"],
             [PYTHON, "-m", "benchmarks.energy_backends", "--seconds", "1"], 35),
        Step("minkowski_cuda", mink, [*mink, "--dry-run"], 0),  # the rest of the 9.5 minutes
    ]  # fmt: skip


def run_step(step: Step, dry_run: bool, seconds: float) -> dict:
    """Run one step; its record: exit status, seconds, result files written, the output's last lines."""
    command = step.dry_run if dry_run else step.gpu
    results = results_folder()
    before = {p: p.stat().st_mtime for p in results.glob("*.json")}
    start = time.perf_counter()
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    # its own process group: a step out of time is stopped with everything it started (pip, nvcc, loader workers)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=seconds)
        status = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status, output = "timeout", f"{output}\nran past {seconds:.0f} s"
    written = sorted(p.name for p in results.glob("*.json") if before.get(p) != p.stat().st_mtime)
    return {"step": step.name, "command": " ".join(command), "exit": status,
            "seconds": round(time.perf_counter() - start, 1), "results_written": written,
            "output_tail": output.strip().splitlines()[-15:]}  # fmt: skip


def minkowski_build(workdir: str, dry_run: bool, seconds: float) -> None:
    """Download MinkowskiEngine 0.5.4's source and build it with CUDA (no ``--cpu_only``); print one JSON line:
    built, or the exact error (the build's last lines). ``--dry-run``: only say what would run."""
    download = [PYTHON, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "minkowskiengine==0.5.4",
                "-d", f"{workdir}/minkowski_src"]  # fmt: skip
    build = [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", f"{workdir}/minkowski_wheel",
             "--config-settings=--build-option=--blas=openblas", "minkowskiengine==0.5.4",
             "--find-links", f"{workdir}/minkowski_src"]  # fmt: skip
    record = {"download": " ".join(download), "build": " ".join(build), "cuda": torch.version.cuda,
              "nvcc": subprocess.run(["which", "nvcc"], capture_output=True, text=True).stdout.strip() or None}  # fmt: skip
    if dry_run:
        print(json.dumps({**record, "dry_run": True}))
        return
    start = time.perf_counter()
    for name, command in (("download", download), ("build", build)):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "SETUPTOOLS_USE_DISTUTILS": "stdlib"}, start_new_session=True)  # fmt: skip
        try:
            output, _ = process.communicate(timeout=max(seconds - (time.perf_counter() - start), 10))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the compilers too
            output, _ = process.communicate()
            record.update(
                built=False,
                failed_at=name,
                error=[*output.strip().splitlines()[-10:], f"ran past {seconds:.0f} s"],
            )
            break
        if process.returncode:
            record.update(built=False, failed_at=name, error=output.strip().splitlines()[-25:])
            break
    else:
        record["built"] = True
    record["seconds"] = round(time.perf_counter() - start, 1)
    write("minkowski_cuda_build_gpu", record)
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="every step tiny, on the CPU")
    parser.add_argument("--only", nargs="*", help="these steps only")
    parser.add_argument("--workdir", default="/tmp/greenlab_gpu_check")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all steps (GPU)")
    parser.add_argument("--minkowski-build", metavar="WORKDIR", help=argparse.SUPPRESS)  # internal: that step
    args = parser.parse_args()
    if args.minkowski_build:
        minkowski_build(args.minkowski_build, args.dry_run, float(os.environ.get("GPU_CHECK_SECONDS", 120)))
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; use --dry-run to check the script on the CPU")
    os.makedirs(args.workdir, exist_ok=True)
    if args.dry_run:  # the committed results stay as they are
        os.environ["GREENLAB_BENCH_RESULTS"] = f"{args.workdir}/results"
    chosen = [s for s in steps(args.workdir) if not args.only or s.name in args.only]
    start, records = time.perf_counter(), []
    for step in chosen:
        left = args.budget - (time.perf_counter() - start)
        seconds = 600 if args.dry_run else (step.seconds or left)
        if not args.dry_run and left < 15:
            records.append(
                {"step": step.name, "exit": "skipped", "reason": f"{left:.0f} s of the budget left"}
            )
            continue
        os.environ["GPU_CHECK_SECONDS"] = str(
            max(min(seconds, left) - 20, 10)
        )  # minkowski_cuda: its record first
        records.append(run_step(step, args.dry_run, min(seconds, left) if not args.dry_run else seconds))
        print(
            json.dumps({k: records[-1][k] for k in ("step", "exit", "seconds", "results_written")}),
            flush=True,
        )
    kind = "dry_run" if args.dry_run else "gpu"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    path = write(f"gpu_check_{kind}", {"device": device, "seconds": round(time.perf_counter() - start, 1),
                                       "steps": records})  # fmt: skip
    print("wrote", path)
    if any(r["exit"] not in (0, "skipped") for r in records) and args.dry_run:
        raise SystemExit("gpu_check --dry-run: a step failed (see " + str(path) + ")")


if __name__ == "__main__":
    main()
