"""Tutorial 2: RETFound-Green against a baseline, compared as the paper does (greenlab.compare).

Train RETFound-Green, score a baseline backbone without training it (greenlab.evaluate: the same probes, the
same held-out set), then put both side by side: one table of median AUROCs with 95 % CIs, a Wilcoxon
signed-rank test on the paired bootstrap vectors, wins / ties / losses and a plot.

    python docs/tutorials/compare_baseline.py --out tutorial_runs/compare   # ~10 min on a 2-core CPU
    GREENLAB_TUTORIAL_TINY=1 python docs/tutorials/compare_baseline.py    # seconds: tiny model, 1 epoch
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

TINY = os.environ.get("GREENLAB_TUTORIAL_TINY") == "1"
TINY_MODEL = [
    "img_size=28",
    "+backbone.model_kwargs.embed_dim=48",
    "+backbone.model_kwargs.depth=2",
    "+backbone.model_kwargs.num_heads=2",
    "evaluation.bootstrap_resamples=10",
    "evaluation.ci_resamples=10",
    "data.num_images=60",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "logger=csv",
]  # fmt: skip  (60 images: every class in the held-out 20 %)


def greenlab(module: str, *args: str) -> None:
    """``python -m <module> <args>``, offline, as you would type it."""
    print(f"\n$ python -m {module} " + " ".join(args))
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", module, *args], check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tutorial_runs/compare_baseline"))
    out = parser.parse_args().out.resolve()
    tiny = TINY_MODEL if TINY else []
    common = [f"paths.data_dir={out / 'data'}", *tiny]  # the embedded default data, generated once

    # 1. RETFound-Green: pre-train and probe (the embedded synthetic fundus set, demo budget).
    green = out / "green"
    greenlab("greenlab", "+experiment=retfound_green", *common, f"hydra.run.dir={green}",
             *(["data.batch_size=8", "trainer.max_epochs=1"] if TINY else []))  # fmt: skip

    # 2. The baseline: the same ViT-S/14 reg4 as it starts, before Token Reconstruction (DINOv2 weights when
    #    they are in your Hugging Face cache, else a random initialisation, said loudly). Any backbone works
    #    here: backbone=retfound_meh backbone.weights=/weights/RETFound_cfp_weights.pth, backbone=timm ...
    baseline = out / "baseline"
    weights = "backbone.weights=random" if TINY else "backbone.weights=cached"
    greenlab("greenlab.evaluate", weights, "evaluation.preprocessing=official", *common,
             f"hydra.run.dir={baseline}")  # fmt: skip

    # 3. Compare: the held-out sets must be the same (ids, order, labels), or compare refuses naming the dataset.
    #    --names: the reference's first, then the runs' in their order.
    comparison = out / "comparison"
    greenlab("greenlab.compare", str(baseline), "--reference", str(green), "--names", "green", "baseline",
             "--out", str(comparison), "--wandb", "disabled")  # fmt: skip

    print(f"\nwhat to look at, in {comparison}:")
    for name in ("comparison.md", "comparison.csv", "pairwise.csv", "comparison.png"):
        print(f"  {name}: {'written' if (comparison / name).exists() else 'missing'}")
    print((comparison / "comparison.md").read_text())


if __name__ == "__main__":
    main()
