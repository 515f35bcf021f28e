"""The typed results (greenlab/results/model.py): one writer and one reader of results.json + bootstrap.npz,
earlier files (no schema_version) still read, and names with a ``/`` compared correctly."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from greenlab.analysis import compare, study
from greenlab.results.model import (
    MACRO,
    SCHEMA_VERSION,
    Comparison,
    Embedding,
    HeldOut,
    Phase,
    Recipe,
    Results,
)
from tests.conftest import REPO

VERSION_1 = REPO / "tests" / "data" / "results_v1"  # written by greenlab before schema_version (HEAD 553546c)


def results(run_dir, shift: float = 0.0) -> Results:
    """A run with a task and a class whose names contain '/', bootstrap draws and a held-out set."""
    rng = np.random.default_rng(0)
    rows = [
        Comparison("linear_probe", "set/a", "grade/dr", cls, 0.7 + shift, [0.6, 0.8], 0.71, 0.5, 12,
                   (rng.uniform(0.6, 0.8, 20) + shift).astype(np.float32))
        for cls in (MACRO, "1/2", "2/3")
    ] + [Comparison("zero_shot", "set/a", "grade/dr", MACRO, 0.6, auroc_point=0.6, n_test=12)]  # fmt: skip
    return Results(
        experiment="x", scale="demo", created="2026-12-02T00:00:00+00:00", greenlab_version="0.1.0",
        run_dir=str(run_dir), recipe=Recipe("x", False, [], None), init={"used": "random"}, data={"name": "set/a"},
        optimized_metric="probe_auroc_macro", metrics={"probe_auroc_macro": 0.7 + shift, "nested": {"a": 1}},
        comparisons=rows, embedding=Embedding(8, "float32", 32, "mean_patch", 100.0, "forward only"),
        compute={"params": 10}, energy={"kwh": 0.001, "co2e_kg": 0.0005},
        phases={"pretrain": Phase(1.0, 0.001, 0.0005, "cpu estimate")}, objective=None, artifacts={},
        config={"seed": 42}, held_out={"set/a": HeldOut(np.array(["i1", "i2"]), np.array([[0], [1]]))},
    )  # fmt: skip


def test_results_round_trip_through_the_run_folder(tmp_path):
    written = results(tmp_path)
    json_path, npz_path = written.write(tmp_path)
    content = json.loads(json_path.read_text())
    assert content["schema_version"] == SCHEMA_VERSION and "draws" not in content["comparisons"][0]
    read = Results.from_folder(tmp_path)
    assert read == written  # every field (the arrays are compared below)
    for a, b in zip(read.comparisons, written.comparisons):
        assert (a.draws is None and b.draws is None) or np.array_equal(a.draws, b.draws)
    assert np.array_equal(read.held_out["set/a"].ids, written.held_out["set/a"].ids)
    assert read.headline() == {"probe_auroc_macro": 0.7}
    with pytest.raises(FileExistsError):  # never overwritten
        written.write(tmp_path)


def test_earlier_results_files_still_load():
    evaluated = Results.from_folder(VERSION_1 / "evaluate")
    assert evaluated.schema_version == 1 and evaluated.pretraining
    rows = {c.comparison: c for c in evaluated.comparisons}
    assert set(rows) == {MACRO, "0", "1", "2"}  # the 3-class task: its macro mean and one row per class
    assert all(len(c.draws) == 10 for c in evaluated.comparisons)
    assert rows[MACRO].auroc == evaluated.metrics["probe_tasks"]["label"]["auroc"]
    assert list(evaluated.held_out) == ["tiny3c"] and len(evaluated.held_out["tiny3c"].ids) == 21
    trained = Results.from_folder(VERSION_1 / "train")
    assert trained.compute["train_flops"] > 0 and trained.embedding.dim == 48


def test_compare_reads_old_and_new_runs(tmp_path):
    """The same scores written by the old and the new code compare as identical (all ties)."""
    old = VERSION_1 / "evaluate"
    new = tmp_path / "new"
    new.mkdir()
    dataclasses.replace(Results.from_folder(old), schema_version=SCHEMA_VERSION).write(new)
    assert json.loads((new / "results.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert compare.main([str(old), str(new), "--out", str(tmp_path / "out"), "--wandb", "disabled"]) == 0
    record = (tmp_path / "out" / "comparison.md").read_text()
    assert "| 0 | 4 | 0 |" in record  # 4 comparisons, tied both ways


def test_a_slash_in_dataset_task_and_class_names_compares(tmp_path):
    for name, shift in (("a", 0.0), ("b", 0.2)):
        (tmp_path / name).mkdir()
        results(tmp_path / name, shift).write(tmp_path / name)
    runs = [compare.load_run(tmp_path / n, n) for n in ("a", "b")]
    assert set(runs[0].vectors) == {
        ("set/a", "grade/dr", c) for c in (MACRO, "1/2", "2/3")
    }  # zero-shot: no draws
    outcome = compare.compare(runs, None, 0.05)
    assert outcome["record"] == {"a": [0, 0, 3], "b": [3, 0, 0]}


def test_study_reads_old_and_new_runs(tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(VERSION_1 / "train", sweep / "old")
    (sweep / "new").mkdir()
    dataclasses.replace(Results.from_folder(VERSION_1 / "train"), schema_version=SCHEMA_VERSION).write(
        sweep / "new"
    )
    study.write_study(sweep, tmp_path / "out", ["seed"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("| 42 |") == 2  # one row per run, the varied key read from each
