import numpy as np
import pytest
import torch

from greenlab.compute import energy
from greenlab.compute.energy import EnergyMeter, co2e_kg, grid_intensity
from greenlab.config import build
from greenlab.evaluation.embeddings import pool
from greenlab.evaluation.statistics import MACRO, one_vs_rest_auroc


def auroc(y, proba, classes):
    return one_vs_rest_auroc(y, proba, classes)[MACRO]


def test_auroc_binary_and_multiclass():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.35, 0.65], [0.2, 0.8]]), np.array([0, 1])) == 1.0
    assert auroc(y, np.array([[0.1, 0.9], [0.4, 0.6], [0.65, 0.35], [0.8, 0.2]]), np.array([0, 1])) == 0.0
    y3 = np.array([0, 1, 2, 2])
    perfect = np.eye(3)[y3]
    assert auroc(y3, perfect, np.array([0, 1, 2])) == 1.0
    assert np.isnan(auroc(np.array([1, 1]), np.array([[0.2, 0.8], [0.3, 0.7]]), np.array([0, 1])))


def test_probe_separates_separable_embeddings_and_fails_on_noise():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 2, 200), rng.integers(0, 2, 100)
    signal = lambda y: rng.normal(0, 1, (len(y), 16)) + 3.0 * y[:, None]  # noqa: E731
    good = build("evaluation/linear_probe", bootstrap_resamples=20, ci_resamples=20).probe_task(
        signal(y_train), y_train, signal(y_test), y_test
    )[0]
    assert good["auroc"] > 0.99 and good["accuracy"] > 0.95 and good["auroc_ci95"][0] > 0.95
    noise = build("evaluation/linear_probe", bootstrap_resamples=20, ci_resamples=20).probe_task(
        rng.normal(size=(200, 16)), y_train, rng.normal(size=(100, 16)), y_test
    )[0]
    assert 0.3 < noise["auroc"] < 0.7


def test_probe_ignores_missing_labels():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    x = rng.normal(size=(100, 4)) + 4.0 * y[:, None]
    y_missing = y.copy()
    y_missing[:30] = -1
    result = build("evaluation/linear_probe", bootstrap_resamples=0).probe_task(x, y_missing, x, y_missing)[0]
    assert result["n_train"] == 70 and result["n_test"] == 70


def test_pooling_variants():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)  # 1 cls + 4 registers + 2 patches
    assert torch.equal(pool(tokens, "cls", 5), tokens[:, 0])
    assert torch.equal(pool(tokens, "mean_all", 5), tokens.mean(1))
    assert torch.equal(pool(tokens, "mean_patch", 5), tokens[:, 5:].mean(1))
    assert pool(tokens, "cls_mean_patch", 5).shape == (2, 6)
    with pytest.raises(ValueError, match="pooling"):
        pool(tokens, "max", 5)


def test_energy_meter_cpu_estimate_counts_busy_time():
    meter = EnergyMeter(cpu_watts_per_core=10.0)
    meter.start()
    x = torch.randn(400, 400)
    for _ in range(200):
        x = torch.tanh(x @ x)
    joules = meter.read()
    if "cpu estimate" in meter.method:
        assert joules > 0.1 and "W/core" in meter.method
    assert co2e_kg(2.0, 0.5, 1.2) == pytest.approx(1.2)


def test_carbon_intensity_by_region_from_the_shipped_table():
    france = grid_intensity("FRA", 0.475)
    assert france["kg_per_kwh"] == 0.056039 and "France (FRA) 2023" in france["source"]
    assert (
        grid_intensity("germany", 0.475)["kg_per_kwh"]
        == grid_intensity("DEU", 0.475)["kg_per_kwh"]
        == 0.38095
    )
    assert grid_intensity(None, 0.475)["kg_per_kwh"] == 0.475  # unset: the configured world average
    with pytest.raises(ValueError, match="compute.region='Atlantis'.*carbon_intensity.csv"):
        grid_intensity("Atlantis", 0.475)


def test_rapl_reads_every_package_and_dram_but_not_core_or_psys(tmp_path, monkeypatch):
    domains = {"intel-rapl:0": "package-0", "intel-rapl:0:0": "core", "intel-rapl:0:1": "dram",
               "intel-rapl:1": "package-1", "intel-rapl:1:0": "dram", "intel-rapl:2": "psys"}  # fmt: skip
    for folder, name in domains.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "name").write_text(name + "\n")
        (tmp_path / folder / "energy_uj").write_text("1000000\n")
        (tmp_path / folder / "max_energy_range_uj").write_text("262143328850\n")
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    meter = EnergyMeter(10.0)
    assert set(meter._rapl) == {
        "rapl:intel-rapl:0",
        "rapl:intel-rapl:0:1",
        "rapl:intel-rapl:1",
        "rapl:intel-rapl:1:0",
    }
    assert "2 CPU package(s), 2 DRAM domain(s)" in meter.method
    meter.start()
    (tmp_path / "intel-rapl:0:1" / "energy_uj").write_text("3000000\n")  # the DRAM of package 0: +2 J
    assert meter.read() == pytest.approx(2.0)
