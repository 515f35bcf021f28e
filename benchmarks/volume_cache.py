"""CT and MRI: what the persistent cache of the deterministic preprocessing saves, per volume.

    python -m benchmarks.volume_cache [--copies 8]

Copies of the real TotalSegmentator CT and MR volumes (../shared/data/totalsegmentator) as a manifest of
``--copies`` studies, at the configs' full sizes (CT: 1.5 x 1.5 x 3 mm, padded 240 x 240 x 120; MRI three
160 x 160 x 32 series), then three ``setup`` passes over one cache folder: cold (every volume preprocessed),
warm (every volume read back) and after one source file was touched (it alone re-processes). Per volume:
seconds cold / warm, the hit rate of each pass (volumes read back / volumes), the cache's size; then one
training epoch's samples/s from the warm cache (read + random crop). Writes benchmarks/results/volume_cache_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import write
from greenlab.config import build

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
MODALITIES = {  # data config, manifest header, source file
    "ct": ("data/ct", "volume,report,finding", "example_ct.nii.gz"),
    "mri": ("data/mri", "sagittal,coronal,axial,report,finding", "example_mr_sm.nii.gz"),
}


def cache_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*.pt")}


def measure(modality: str, copies: int, work: Path) -> dict:
    config, header, source = MODALITIES[modality]
    folder = work / modality
    folder.mkdir()
    volumes = []
    for i in range(copies):
        volumes.append(folder / f"study{i}.nii.gz")
        shutil.copy(SHARED / source, volumes[-1])
    columns = header.count(",") - 1  # the series columns (one for CT, three for MRI)
    rows = [",".join([str(v)] * columns + [f"Study {i}.", str(i % 2)]) for i, v in enumerate(volumes)]
    (folder / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    cache = work / f"{modality}_cache"

    def setup_pass():
        before = cache_files(cache) if cache.exists() else {}
        data = build(config, manifest=str(folder / "manifest.csv"), cache_dir=str(cache), num_workers=0,
                     held_out_fraction=0.25, output_dir=str(work / "run"))  # fmt: skip
        start = time.perf_counter()
        data.setup()
        seconds = time.perf_counter() - start
        after = cache_files(cache)
        written = sum(1 for name, stamp in after.items() if before.get(name) != stamp)
        return seconds / copies, 1 - written / copies, data

    cold, cold_hits, _ = setup_pass()
    warm, warm_hits, data = setup_pass()
    os.utime(volumes[0], ns=(time.time_ns(), time.time_ns()))  # an edited study
    touched, touched_hits, _ = setup_pass()
    start = time.perf_counter()
    for i in range(len(data.pretrain_set)):
        data.pretrain_set[i]
    epoch = len(data.pretrain_set) / (time.perf_counter() - start)
    return {
        "modality": modality,
        "volumes": copies,
        "seconds_per_volume_cold": cold,
        "seconds_per_volume_warm": warm,
        "seconds_per_volume_one_touched": touched,
        "hit_rate_cold": cold_hits,
        "hit_rate_warm": warm_hits,
        "hit_rate_one_touched": touched_hits,
        "cache_megabytes_per_volume": sum(p.stat().st_size for p in cache.rglob("*.pt")) / copies / 1e6,
        "training_samples_per_second_warm": epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8)
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"needs the real volumes in {SHARED}")
    with tempfile.TemporaryDirectory() as work:
        results = [measure(m, args.copies, Path(work)) for m in MODALITIES]
    for r in results:
        print(r, flush=True)
    print("wrote", write("volume_cache_cpu", {"results": results}))


if __name__ == "__main__":
    main()
