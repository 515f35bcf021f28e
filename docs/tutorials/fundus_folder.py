"""Tutorial 1: your folder of fundus photographs, end to end.

Pre-train RETFound-Green's Token Reconstruction on a folder of photographs with a labels CSV, score the backbone
with linear probes, and read what the run wrote. Here the "photographs" are a few synthetic fundus images that
greenlab draws (greenlab.data.embedded.generate); point ROOT and LABELS at your own folder instead.

    python docs/tutorials/fundus_folder.py --out tutorial_runs/fundus      # ~5 min on a 2-core CPU
    GREENLAB_TUTORIAL_TINY=1 python docs/tutorials/fundus_folder.py       # seconds: tiny model, 1 epoch
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from greenlab.data.embedded import generate
from greenlab.results.model import Results

TINY = os.environ.get("GREENLAB_TUTORIAL_TINY") == "1"
# a 2-block ViT of 48 dims at 28 px, 1 epoch, 10 bootstrap resamples: the pipeline in seconds (tests/conftest.py)
TINY_OVERRIDES = ["img_size=28", "+backbone.model_kwargs.embed_dim=48", "+backbone.model_kwargs.depth=2",
                  "+backbone.model_kwargs.num_heads=2", "data.batch_size=8", "data.eval_batch_size=16",
                  "data.num_workers=0", "trainer.max_epochs=1", "evaluation.bootstrap_resamples=10",
                  "evaluation.ci_resamples=10", "logger=csv"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tutorial_runs/fundus_folder"))
    out = parser.parse_args().out.resolve()

    # 1. A folder of photographs (jpg/png/tif/bmp, found recursively) and a labels CSV: an id column (file stem,
    #    file name or relative path) and one integer column per task; blank = unlabelled.
    folder = generate(out / "photos", num_images=24 if TINY else 120)
    root, labels = folder / "images", folder / "labels.csv"
    print(f"photographs: {root} ({len(list(root.glob('*.png')))} PNGs)")
    print(f"labels:      {labels}\n{labels.read_text().splitlines()[0]} ...")

    # 2. The main experiment on that folder: the public command line, one subprocess.
    run_dir = out / "run"
    command = [sys.executable, "-m", "greenlab", "+experiment=retfound_green", "data=fundus_folder",
               f"data.root={root}", f"data.labels_csv={labels}", "data.id_column=image_id",
               f"paths.data_dir={out / 'cache'}", f"hydra.run.dir={run_dir}",
               *(TINY_OVERRIDES if TINY else [])]  # fmt: skip
    print("\n$ " + " ".join(command[1:]))
    subprocess.run(command, check=True, env={**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"})

    # 3. What to look at: results.md (readable), results.json through the results model.
    results = Results.from_folder(run_dir)
    print(f"\nrun folder: {run_dir}")
    print("files:", ", ".join(sorted(p.name for p in run_dir.iterdir())))
    print(f"probe AUROC (macro of bootstrap medians): {results.metrics['probe_auroc_macro']:.3f}")
    print(
        f"  before pre-training:                   {results.metrics['initial_backbone']['probe_auroc_macro']:.3f}"
    )
    print(f"initialisation used: {results.init['used']} (offline there are no DINOv2 weights: random)")
    print(
        f"faithful to the paper's recipe: {results.recipe.faithful} ({len(results.recipe.deviations)} deviations)"
    )
    print(
        f"train FLOPs: {results.compute['train_flops']:.3g}, energy: {results.energy['kwh']:.2g} kWh "
        f"({results.energy['method']}), CO2e: {results.energy['co2e_kg'] * 1000:.2g} g"
    )
    for c in results.comparisons:  # a tiny held-out set may hold one class only: no AUROC (null)
        auroc = "n/a" if c.auroc is None else f"{c.auroc:.3f} (95 % CI {c.auroc_ci95})"
        print(f"  {c.task:>14} {c.comparison:>6}: AUROC {auroc}")
    print(f"\nread next: {run_dir / 'results.md'}")


if __name__ == "__main__":
    main()
