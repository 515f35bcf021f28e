"""greenlab.analysis.study: sweep folders -> tables and plots (ablation and efficiency comparison)."""

from __future__ import annotations

import csv
import json

from greenlab.analysis.study import write_efficiency, write_study


def fake_results(device_hours: float, auroc: float, init: dict, noise: float) -> dict:
    return {
        "experiment": "x", "scale": "demo", "init": init, "data": {"name": "Data"},
        "config": {"objective": {"_target_": "greenlab.objectives.mae.MaskedAutoencoder", "noise_std": noise}},
        "metrics": {"probe_auroc_macro": auroc, "probe_tasks": {"grade": {"auroc": auroc}}},
        "compute": {"params": 1000, "train_flops": 1e12, "train_flops_per_image": 1e9, "device_hours": device_hours,
                    "train_images_seen": 256,
                    "train_throughput_img_s": 10.0, "device": "cpu"},
        "energy": {"kwh": 0.002, "co2e_kg": 0.001},
        "embedding": {"dim": 384, "bytes_per_image": 1536, "throughput_img_s": 50.0},
    }  # fmt: skip


def test_efficiency_table_prices_device_hours_and_draws_plots(tmp_path):
    sweep = tmp_path / "sweep"
    runs = {"mae": (0.5, 0.7, {"used": "random"}), "must": (0.1, 0.8, {"image": {"used": "random"}})}
    for name, (hours, auroc, init) in runs.items():
        (sweep / name).mkdir(parents=True)
        (sweep / name / "results.json").write_text(json.dumps(fake_results(hours, auroc, init, 0.0)))
    files = write_efficiency(sweep, tmp_path / "out", price_per_device_hour=3.0)
    with (tmp_path / "out" / "table.csv").open() as handle:
        header, *rows = list(csv.reader(handle))
    cost = {row[0]: float(row[header.index("cost $")]) for row in rows}
    assert cost == {"mae": 1.5, "must": 0.3}
    assert [row[header.index("init")] for row in rows] == ["random", "image random"]
    assert rows[0][header.index("probe AUROC")] == "0.700" and rows[0][header.index("emb bytes")] == "1536"
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)


def test_ablation_table_has_a_column_per_varied_key(tmp_path):
    for i, noise in enumerate((0.0, 0.2)):
        (tmp_path / "sweep" / str(i)).mkdir(parents=True)
        results = fake_results(0.1, 0.6 + noise, {"used": "random"}, noise)
        (tmp_path / "sweep" / str(i) / "results.json").write_text(json.dumps(results))
    write_study(tmp_path / "sweep", tmp_path / "out", ["objective.noise_std"])
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert "objective.noise_std" in lines[2] and lines[-1].startswith(
        "| 1 | MaskedAutoencoder | 0.2 | 0.800 |"
    )
