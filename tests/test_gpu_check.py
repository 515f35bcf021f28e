"""The GPU check (``make bench-gpu``, benchmarks/gpu_check.py) runs end to end on the CPU with ``--dry-run``: every
step at a tiny size, its record and result files in a scratch folder, the committed results untouched."""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import REPO


def test_make_bench_gpu_dry_run_runs_every_step(tmp_path):
    committed = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("*.json")}
    env = {
        **os.environ,
        "GREENLAB_HOME": str(tmp_path / "home"),
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(["make", "bench-gpu", f"GPU_CHECK_ARGS=--dry-run --workdir {tmp_path / 'check'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "check" / "results" / "gpu_check_dry_run.json").read_text())
    steps = {s["step"]: s for s in record["steps"]}
    assert list(steps) == ["ddp", "training_steps", "loader_ratio_device", "loader_ratio_workers", "augment_on",
                           "augment_parity", "spark_profile", "energy", "minkowski_cuda"]  # fmt: skip
    assert all(s["exit"] == 0 for s in steps.values()), {
        n: s["output_tail"] for n, s in steps.items() if s["exit"]
    }
    written = {n: s["results_written"] for n, s in steps.items()}
    assert written["training_steps"] == ["training_steps_cpu_tiny.json"]
    assert any("augment_ondevice" in f for f in written["loader_ratio_device"])
    assert any("augment_onworkers" in f for f in written["loader_ratio_workers"])
    assert written["augment_on"] == ["loader_cache_cpu_augment_on.json"]
    assert written["energy"] == ["energy_backends_cpu.json"] and written["spark_profile"]
    ddp = json.loads((tmp_path / "check" / "ddp" / "results.json").read_text())
    assert ddp["compute"]["world_size"] == 1  # the README's DDP command, one device (augmented as on a GPU)
    assert ddp["data"]["augment_on"]["ran_on"] == "device"
    mink = json.loads(steps["minkowski_cuda"]["output_tail"][-1])
    assert mink["dry_run"] and "--no-binary :all: minkowskiengine==0.5.4" in mink["download"]
    after = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("*.json")}
    assert after == committed  # the dry run wrote into its scratch folder only
