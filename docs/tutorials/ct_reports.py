"""Tutorial 3: CT studies with free-text reports, labelled by the rules labeller, then GreenRFM.

Your CT data is a CSV manifest, one row per study: the volume (a NIfTI file or a DICOM series folder) and its
report. Here greenlab draws a few synthetic chest CTs with reports (greenlab.data.embedded_ct.generate; its
truth.csv keeps what was drawn). The rules labeller turns each report into one label per finding (1 present,
0 absent, -1 uncertain, blank not mentioned); we check it against the truth, then train GreenRFM (MUST: image
and text encoders label-supervised, then aligned) on the manifest, distilling the labels inside the run.

    python docs/tutorials/ct_reports.py --out tutorial_runs/ct      # ~10 min on a 2-core CPU
    GREENLAB_TUTORIAL_TINY=1 python docs/tutorials/ct_reports.py   # seconds: tiny volumes and networks
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from greenlab.data.embedded_ct import generate
from greenlab.results.model import Results

TINY = os.environ.get("GREENLAB_TUTORIAL_TINY") == "1"
# 2 cm voxels, a ResNet-10, a 1-layer BERT, 1 epoch per stage (tests/conftest.py's TINY_GREENRFM)
TINY_OVERRIDES = ["data.spacing=[20,20,30]", "data.pad_size=[16,16,10]", "data.crop_size=[16,16,8]",
                  "data.batch_size=6", "data.eval_batch_size=6", "data.num_workers=0", "backbone.depth=10",
                  "text_encoder.vocab_size=200", "text_encoder.hidden_size=32", "text_encoder.num_layers=1",
                  "text_encoder.num_heads=2", "objective.latent_dim=16", "objective.stage1_epochs=1",
                  "trainer.max_epochs=2", "evaluation.linear_probe.bootstrap_resamples=10",
                  "evaluation.linear_probe.ci_resamples=10", "logger=csv"]  # fmt: skip
# the generated volumes' own grid (5 x 5 x 7.5 mm, 64 x 64 x 40), as data=embedded_ct
DEMO_OVERRIDES = ["data.spacing=[5.0,5.0,7.5]", "data.pad_size=[64,64,40]", "data.crop_size=[56,56,32]"]


def greenlab(module: str, *args: str) -> None:
    """``python -m <module> <args>``, offline, as you would type it."""
    print(f"\n$ python -m {module} " + " ".join(args))
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", module, *args], check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tutorial_runs/ct_reports"))
    out = parser.parse_args().out.resolve()

    # 1. A manifest of studies: volume, report (paths relative to the manifest's folder).
    folder = generate(out / "ct", num_volumes=24 if TINY else 120)
    manifest = folder / "manifest.csv"
    with manifest.open(newline="") as handle:
        first = next(csv.DictReader(handle))
    print(f"manifest: {manifest}\n  {first['volume']}: {first['report'][:160]} ...")

    # 2. Reports -> labels with the rules labeller, on its own (a CSV in, a CSV out).
    labels = out / "labels.csv"
    if not labels.exists():  # an existing output is never replaced
        greenlab("greenlab.labels", "--input", str(manifest), "--id-column", "volume", "--text-columns", "report",
                 "--findings", "ctrate18", "--backend", "rules", "--output", str(labels))  # fmt: skip
    with labels.open(newline="") as a, (folder / "truth.csv").open(newline="") as b:
        distilled, truth = list(csv.DictReader(a)), list(csv.DictReader(b))
    print(
        "\nfinding: reports labelled present / absent / uncertain / not mentioned; present label = drawn truth"
    )
    for finding in ("pleural_effusion", "lung_nodule", "emphysema", "cardiomegaly"):
        values = [row[finding] for row in distilled]
        counts = {v: values.count(v) for v in ("1", "0", "-1", "")}
        agree = sum((d[finding] == "1") == (t[finding] == "1") for d, t in zip(distilled, truth))
        print(
            f"  {finding:>17}: {counts['1']:>3} / {counts['0']:>3} / {counts['-1']:>3} / {counts['']:>3};"
            f" agreement {agree}/{len(truth)}"
        )

    # 3. GreenRFM on the manifest, the labels distilled inside the run (data/labeller=rules).
    run_dir = out / "greenrfm"
    greenlab("greenlab", "+experiment=greenrfm_lite", "data=ct", f"data.manifest={manifest}",
             "data/labeller=rules", "data.text_only_reports=null", f"paths.data_dir={out / 'cache'}",
             f"hydra.run.dir={run_dir}", *(TINY_OVERRIDES if TINY else DEMO_OVERRIDES))  # fmt: skip
    results = Results.from_folder(run_dir)
    print(f"\nrun folder: {run_dir}  (report_labels.csv: the labels the run distilled)")
    print(f"zero-shot macro AUROC: {results.metrics.get('zero_shot_auroc_macro')}")
    print(f"findings never labelled present / absent in training: {results.data.get('unlabelled_findings')}")
    print(f"energy: {results.energy['kwh']:.2g} kWh ({results.energy['method']})")
    print(f"read next: {run_dir / 'results.md'}")


if __name__ == "__main__":
    main()
