"""Comparing models as the papers do: grouped and official splits, per-class AUROCs, Wilcoxon tests,
``greenlab.compare``'s refusals, and the baselines' released checkpoint formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from scipy.stats import wilcoxon
from sklearn.metrics import roc_auc_score

from greenlab.analysis import compare
from greenlab.config import build
from greenlab.data import splits
from greenlab.evaluation.statistics import MACRO, one_vs_rest_auroc, wilcoxon_p
from tests.test_data import labelled_photos, write_images


@pytest.mark.parametrize("stratified", [True, False])
def test_grouped_split_never_puts_a_group_on_both_sides(stratified):
    rng = np.random.default_rng(0)
    for trial in range(60):  # random groupings: 5-40 groups of 1-6 images, random labels
        sizes = rng.integers(1, 7, rng.integers(5, 41))
        groups = np.repeat([f"patient{g}" for g in range(len(sizes))], sizes).tolist()
        strata = rng.integers(-1, 3, len(groups)).tolist() if stratified else None
        flags, record = splits.by_group(groups, strata, 0.2, trial, "patient_id")
        sides = {}
        for group, flag in zip(groups, flags):
            assert sides.setdefault(group, flag) == flag, f"trial {trial}: {group} on both sides"
        assert record["groups"] == len(sizes) and 0 < record["groups_held_out"] < len(sizes)
        assert record["images_held_out"] == sum(flags)


def test_grouped_split_is_stratified_where_groups_allow():
    groups = [f"p{i // 2}" for i in range(400)]  # 200 patients, two images each, one label per patient
    labels = [int(i // 2 % 4 == 0) for i in range(400)]  # 25 % positive
    flags, _ = splits.by_group(groups, labels, 0.2, 42, "patient")
    held = np.array(labels)[np.array(flags)]
    assert held.mean() == pytest.approx(0.25, abs=0.02) and len(held) == 80


def test_too_few_groups_is_an_error_naming_the_column():
    with pytest.raises(ValueError, match="'subject'.*3 group"):
        splits.by_group(["a", "b", "c"], None, 0.2, 0, "subject")


def test_folder_with_a_patient_column_splits_by_patient(tmp_path):
    write_images(tmp_path / "photos", count=40)
    rows = [f"img{i},{i % 2},P{i // 4}" for i in range(40)]  # 10 patients of 4 photographs
    (tmp_path / "labels.csv").write_text("image_id,dr,patient_id\n" + "\n".join(rows) + "\n")
    dm = labelled_photos(tmp_path)
    dm.setup()
    assert [t.name for t in dm.tasks] == ["dr"]  # the group column is not a task
    patient = lambda image_id: int(image_id[3:]) // 4  # noqa: E731
    train = {patient(i) for i in dm.probe_train_set.ids}
    test = {patient(i) for i in dm.probe_test_set.ids}
    assert test and not train & test
    assert dm.describe()["split"]["group_column"] == "patient_id" and dm.describe()["split"]["groups"] == 10


def test_official_split_column_is_honoured_exactly(tmp_path):
    write_images(tmp_path / "photos", count=12)
    sides = ["train"] * 6 + ["Val"] * 2 + ["TEST"] * 4
    rows = [f"img{i},{i % 2},{s}" for i, s in enumerate(sides)]
    (tmp_path / "labels.csv").write_text("image_id,dr,split\n" + "\n".join(rows) + "\n")
    dm = labelled_photos(tmp_path, split_column="split")
    dm.setup()
    assert set(dm.probe_train_set.ids) == {f"img{i}" for i in range(6)}
    assert set(dm.probe_test_set.ids) == {f"img{i}" for i in range(8, 12)}
    assert set(dm.pretrain_set.ids) == {f"img{i}" for i in range(8)}  # train + val pre-train, test never
    assert dm.describe()["split"] == {"method": "official ('split' column)", "split_column": "split",
                                      "train": 6, "val": 2, "test": 4, "held_out_side": "test"}  # fmt: skip


def test_unknown_split_value_names_file_row_and_value(tmp_path):
    write_images(tmp_path / "photos", count=3)
    (tmp_path / "labels.csv").write_text("image_id,dr,split\nimg0,0,train\nimg1,1,tset\nimg2,1,test\n")
    with pytest.raises(ValueError, match=r"labels\.csv: split column 'split', row 3: 'tset'"):
        labelled_photos(tmp_path, split_column="split").setup()


def test_per_class_aurocs_equal_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    proba = rng.dirichlet(np.ones(4), 300) + np.eye(4)[y] * 0.3
    proba /= proba.sum(1, keepdims=True)
    scores = one_vs_rest_auroc(y, proba, np.arange(4))
    for c in range(4):
        assert scores[str(c)] == pytest.approx(roc_auc_score(y == c, proba[:, c]), abs=1e-12)
    assert scores[MACRO] == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12
    )


def test_wilcoxon_p_equals_scipy():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.80, 0.02, 100), rng.normal(0.79, 0.02, 100)
    assert wilcoxon_p(a, b) == pytest.approx(wilcoxon(a, b).pvalue, rel=1e-12)
    a_with_nan = a.copy()
    a_with_nan[:3] = np.nan  # unscorable resamples: their pairs are left out
    assert wilcoxon_p(a_with_nan, b) == pytest.approx(wilcoxon(a[3:], b[3:]).pvalue, rel=1e-12)
    assert wilcoxon_p(a, a) == 1.0


def fake_run(folder, name, ids, labels, medians, seed):
    """A run folder as greenlab writes it: results.json (probe_tasks) + bootstrap.npz."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    record = {"dataset": "retina", "task": "dr", "auroc": medians[MACRO], "auroc_point": medians[MACRO],
              "auroc_ci95": [medians[MACRO] - 0.05, medians[MACRO] + 0.05],
              "per_class": {c: {"auroc": m, "auroc_point": m, "auroc_ci95": [m - 0.1, m + 0.1]}
                            for c, m in medians.items() if c != MACRO}}  # fmt: skip
    spent = {"compute": {"train_flops_per_image": 2.5e9, "train_images_seen": 1000, "device_hours": 0.125},
             "energy": {"kwh": 0.002, "co2e_kg": 0.001}, "scale": "demo", "init": {"used": "random"}}  # fmt: skip
    (folder / "results.json").write_text(
        json.dumps({"experiment": name, "metrics": {"probe_tasks": {"dr": record}}, **spent})
    )
    arrays = {f"auroc/retina/dr/{c}": m + rng.normal(0, 0.01, 100) for c, m in medians.items()}
    np.savez(folder / "bootstrap.npz", **arrays, **{"ids/retina": np.array(ids), "labels/retina": labels})
    return folder


def test_compare_counts_wins_and_writes_tables(tmp_path):
    ids, labels = [f"img{i}" for i in range(50)], np.arange(50)[:, None] % 3
    strong = fake_run(tmp_path / "a", "strong", ids, labels, {"0": 0.9, "1": 0.8, "2": 0.85, MACRO: 0.85}, 0)
    weak = fake_run(tmp_path / "b", "weak", ids, labels, {"0": 0.7, "1": 0.8, "2": 0.6, MACRO: 0.7}, 1)
    assert compare.main([str(strong), str(weak), "--out", str(tmp_path / "out"), "--wandb", "disabled"]) == 0
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "| strong:a | 3 | 1 | 0 |" in table and "| weak:b | 0 | 1 | 3 |" in table  # class 1: a tie
    cost = "| strong:a | strong | random | 2.50e+09 | 1,000 | 0.1250 | 0.00200 | 1.00 |"  # what the run spent
    assert cost in table
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "comparison.csv",
        "pairwise.csv",
        "comparison.png",
    }
    with pytest.raises(SystemExit):  # never over an earlier comparison
        compare.main([str(strong), str(weak), "--out", str(tmp_path / "out"), "--wandb", "disabled"])


@pytest.mark.parametrize("change", ["ids", "labels"])
def test_compare_refuses_different_test_sets_and_names_the_dataset(tmp_path, capsys, change):
    ids, labels = [f"img{i}" for i in range(50)], np.arange(50)[:, None] % 3
    medians = {"0": 0.9, "1": 0.8, "2": 0.85, MACRO: 0.85}
    other_ids = ids[:49] + ["img99"] if change == "ids" else ids
    other_labels = labels[::-1].copy() if change == "labels" else labels
    a = fake_run(tmp_path / "a", "a", ids, labels, medians, 0)
    b = fake_run(tmp_path / "b", "b", other_ids, other_labels, medians, 1)
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "out"), "--wandb", "disabled"]) == 2
    error = capsys.readouterr().err
    assert "test sets differ: dataset 'retina'" in error and str(b) in error
    assert ("'img49' vs 'img99'" in error) if change == "ids" else ("other labels" in error)
    assert not (tmp_path / "out").exists()


def tiny_vit_state(model_name: str) -> tuple[dict, dict]:
    kwargs = {"embed_dim": 48, "depth": 2, "num_heads": 2}
    return timm.create_model(model_name, num_classes=0, img_size=56, **kwargs).state_dict(), kwargs


def test_retfound_meh_checkpoint_loads_encoder_and_lists_the_decoder(tmp_path):
    """RETFound_cfp_weights.pth is MAE's pre-training checkpoint: {"model": encoder + decoder + mask_token}."""
    encoder, kwargs = tiny_vit_state("vit_large_patch16_224")
    decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 48),
               "decoder_pos_embed": torch.zeros(1, 17, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
               "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.zeros(768, 32)}  # fmt: skip
    torch.save({"model": {**encoder, **decoder}, "epoch": 799}, tmp_path / "RETFound_cfp_weights.pth")
    vit = build("backbone/retfound_meh", weights=str(tmp_path / "RETFound_cfp_weights.pth"), img_size=56,
                model_kwargs=kwargs)  # fmt: skip
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in encoder.items())
    assert vit.init_record["used"] == "file"
    note = vit.init_record["note"]
    assert "decoder_blocks" in note and "mask_token" in note and "decoder_pred" in note
    assert vit.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_retfound_dinov2_checkpoint_loads_its_teacher_backbone(tmp_path):
    """RETFound_dinov2_meh.pth: a DINOv2 training checkpoint, {"teacher": {"backbone.*", "dino_head.*"}}."""
    encoder, kwargs = tiny_vit_state("vit_large_patch14_dinov2")
    teacher = {f"backbone.{k}": v for k, v in encoder.items()}
    teacher |= {"backbone.mask_token": torch.zeros(1, 48), "dino_head.mlp.0.weight": torch.zeros(8, 48),
                "dino_head.last_layer.weight_g": torch.ones(16, 1)}  # fmt: skip
    torch.save({"teacher": teacher}, tmp_path / "RETFound_dinov2_meh.pth")
    vit = build("backbone/retfound_dinov2", weights=str(tmp_path / "RETFound_dinov2_meh.pth"), img_size=56,
                model_kwargs=kwargs)  # fmt: skip
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in encoder.items())
    assert "dino_head" in vit.init_record["note"] and "mask_token" in vit.init_record["note"]


def test_any_timm_model_by_name_is_a_backbone():
    cnn = build("backbone/timm", model_name="resnet18", img_size=32)
    assert cnn.eval().forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    assert cnn.num_features == 512 and cnn.init_record["used"] == "random"


def test_compare_lists_a_class_without_auroc_and_compares_the_rest(tmp_path):
    """A class with no AUROC in one run (its held-out set had one class: null in results.json) is listed as not
    compared; the others are compared (greenlab.compare stopped on a TypeError)."""
    ids, labels = [f"img{i}" for i in range(50)], np.arange(50)[:, None] % 3
    strong = fake_run(tmp_path / "a", "strong", ids, labels, {"0": 0.9, "1": 0.8, "2": 0.85, MACRO: 0.85}, 0)
    weak = fake_run(tmp_path / "b", "weak", ids, labels, {"0": 0.7, "1": 0.8, "2": 0.6, MACRO: 0.7}, 1)
    results = json.loads((weak / "results.json").read_text())
    results["metrics"]["probe_tasks"]["dr"]["per_class"]["2"].update(
        auroc=None, auroc_point=None, auroc_ci95=None
    )
    (weak / "results.json").write_text(json.dumps(results))
    assert compare.main([str(strong), str(weak), "--out", str(tmp_path / "out"), "--wandb", "disabled"]) == 0
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "Not compared (no AUROC in some run: its held-out set had one class): retina/dr/2" in table
    assert "| strong:a | 2 | 1 | 0 |" in table  # macro and class 0 won, class 1 a tie
