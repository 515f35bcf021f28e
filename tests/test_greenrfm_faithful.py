"""GreenRFM at scale=paper as the official code (SadVoxel/GreenRFM, issue #27): the label coding (data/ct_rate.py,
data/merlin.py), stage 1's optimiser and per-iteration cosine (training/supervise_pretrain.py), the zero-shot
population (inference/zero_shot.py), fp32, and a faithful recipe. The MUST stages: tests/test_must.py; the
official LLM prompt: tests/test_labels_llm.py."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score
from torch import nn

from greenlab.config import CONFIG_DIR, build
from greenlab.data.base import MISSING, UNCERTAIN, Task
from greenlab.data.volumes import VolumeDataModule
from greenlab.labels import tables
from greenlab.objectives.label_supervised import code_labels, masked_bce
from tests.test_must import OracleModel
from tests.test_recipe import check

# a labels table as the official loaders read it: 1, 0, -1 (uncertain) and blank (not mentioned / not labelled)
TABLE = "VolumeName,a,b,c\nv1,1,0,-1\nv2,,1,0\nv3,-1,,1\nv4,0,-1,\nv5,,,1\n"


def official_targets(path) -> torch.Tensor:
    """data/ct_rate.py _prepare_samples: ``df[label_cols].apply(pd.to_numeric, errors="coerce").fillna(0.0)``."""
    df = pd.read_csv(path)
    label_cols = [c for c in df.columns if c != "VolumeName"]
    df[label_cols] = df[label_cols].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    return torch.tensor(df[label_cols].to_numpy(np.float32))


def greenlab_labels(path) -> torch.Tensor:
    """The table as greenlab's volume data modules code it (1, 0, UNCERTAIN, MISSING)."""
    table = tables.read_csv(path, "labels CSV")
    reader = SimpleNamespace(labeller=None, manifest=path, label_columns=["a", "b", "c"])
    names, labels = VolumeDataModule._labels(reader, table, [""] * len(table))
    assert names == ["a", "b", "c"]
    return labels


def test_official_label_coding_on_a_fixed_table(tmp_path):
    """uncertain=target, unmentioned=negative (the paper default): the official targets (blank -> 0, -1 kept),
    nothing masked, and the loss is torch's nn.BCEWithLogitsLoss() on them; each -1 costs softplus(z) + z."""
    path = tmp_path / "labels.csv"
    path.write_text(TABLE)
    labels, official = greenlab_labels(path), official_targets(path)
    assert (labels == UNCERTAIN).sum() == 3 and (labels == MISSING).sum() == 5
    paper = build("objective/label_supervised", backbone=nn.Identity())
    assert (paper.hparams.uncertain, paper.hparams.unmentioned) == ("target", "negative")
    targets, known = code_labels(labels, paper.hparams.uncertain, paper.hparams.unmentioned)
    assert torch.equal(targets, official) and known.all()
    logits = torch.linspace(-3.0, 3.0, 15).reshape(5, 3).requires_grad_()
    loss = masked_bce(logits, targets, known)
    torch.testing.assert_close(loss, nn.BCEWithLogitsLoss()(logits, official))
    minus_one = official == -1
    per_entry = nn.BCEWithLogitsLoss(reduction="none")(logits, official)
    torch.testing.assert_close(per_entry[minus_one], F.softplus(logits[minus_one]) + logits[minus_one])
    (gradient,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(  # sigmoid(z) + 1 > 0: a -1 target pushes its logit down, unbounded
        gradient[minus_one], (torch.sigmoid(logits[minus_one]) + 1) / official.numel()
    )
    # greenlab's option: both masked, the mean over the labelled entries alone
    targets, known = code_labels(labels, "mask", "mask")
    assert known.sum() == 15 - 8
    expected = nn.BCEWithLogitsLoss()(logits[labels >= 0], labels[labels >= 0].float())
    torch.testing.assert_close(masked_bce(logits, targets, known), expected)
    with pytest.raises(ValueError, match="uncertain must be one of"):
        build("objective/label_supervised", backbone=nn.Identity(), uncertain="ignore")


class TinyEncoder(nn.Module):
    """A 3D volume -> 6 features, with weight matrices, biases and a norm (every kind of parameter)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.LayerNorm(6))

    def forward(self, volumes):
        return self.net(volumes)


class TinyData(L.LightningDataModule):
    tasks, batch_size = [Task("a", 2), Task("b", 2)], 4

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        volumes = torch.randn(10, 1, 2, 2, 2, generator=generator)
        labels = torch.tensor([[1, 0], [0, -2], [-1, 1], [1, 1], [0, 0]] * 2)
        return torch.utils.data.DataLoader(list(zip(volumes, labels)), batch_size=self.batch_size)


class LrProbe(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_stage1_optimiser_as_supervise_pretrain(tmp_path):
    """AdamW over every parameter at weight decay 1e-4 (one group) and the cosine lr of CosineAnnealingLR(T_max
    = epochs x batches, eta_min 1e-6) stepped after every batch; ``matrices`` / ``epoch`` are greenlab's."""
    torch.manual_seed(0)
    module, probe = build("objective/label_supervised", backbone=TinyEncoder()), LrProbe()
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path), callbacks=[probe])  # fmt: skip
    trainer.fit(module, datamodule=TinyData())
    (group,) = trainer.optimizers[0].param_groups
    assert group["weight_decay"] == 1e-4 and {id(p) for p in group["params"]} == {
        id(p) for p in module.parameters()
    }
    assert any(p.ndim == 1 for p in group["params"])  # biases and the norm decayed too

    reference = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4, weight_decay=1e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=5 * 3, eta_min=1e-6)  # 3 batches
    official = []
    for _ in range(15):
        official.append(reference.param_groups[0]["lr"])
        reference.step()
        cosine.step()
    assert len(probe.lrs) == 15
    for step in (0, 1, 2, 3, 7, 14):
        assert probe.lrs[step] == pytest.approx(official[step], rel=1e-9), step
    assert module.run_notes()["stage1_subset"].startswith("every training study")

    configured = build("objective/label_supervised", backbone=TinyEncoder(), weight_decay_on="matrices",
                       lr_interval="epoch")  # fmt: skip
    configured.head = nn.Linear(6, 2)
    optimiser = configured.configure_optimizers()
    decays = {g["weight_decay"]: len(g["params"]) for g in optimiser["optimizer"].param_groups}
    assert decays == {1e-4: 2, 0.0: 4} and optimiser["lr_scheduler"]["interval"] == "epoch"


class ScoreModel(OracleModel):
    """Image latent = a given score per finding; the positive prompt of finding k = e_k, the negative one 0, so
    p_k = sigmoid(score_k)."""

    def encode_text(self, texts):
        out = torch.zeros(len(texts), len(self.names))
        for i, text in enumerate(texts):
            for k, name in enumerate(self.names):
                if text == f"There is {name.capitalize()}.":  # p3's positive prompt, sentence case
                    out[i, k] = 1.0
        return out


def zero_shot(population: str, labels: torch.Tensor, scores: torch.Tensor):
    names = [f"finding{k}" for k in range(labels.shape[1])]
    loader = torch.utils.data.DataLoader(list(zip(scores, labels)), batch_size=4)

    class Data:
        dataset_name = "fixed"
        tasks = [Task(n, 2) for n in names]
        test_reports = ["finding0."] * len(labels)

        def probe_dataloaders(self):
            return None, loader

        def held_out_ids(self):
            return [f"study{i}" for i in range(len(labels))]

    evaluation = build("evaluation/zero_shot", linear_probe=None, population=population, bootstrap=20)
    return evaluation(ScoreModel(names), Data(), torch.device("cpu"))


def test_zero_shot_population_official_and_labelled(capsys):
    """official (the paper default, inference/zero_shot.py): every held-out study, unmentioned = 0, uncertain
    = -1, ``try: roc_auc_score except: auc = 0.5``, the mean over every finding; labelled: present vs absent."""
    m, u = MISSING, UNCERTAIN
    labels = torch.tensor([  # finding0: 1/0/unmentioned; 1: with uncertain; 2: 1 / uncertain; 3: 0 / uncertain
        [1, 1, 1, 0, 0], [0, 0, u, u, m], [m, u, 1, m, 0], [1, 1, u, 0, 0],
        [m, 0, 1, u, m], [0, 1, u, m, 0], [1, u, 1, 0, 0], [m, 0, u, u, m],
    ])  # fmt: skip   # finding4: absent or unmentioned only
    scores = torch.tensor(np.random.default_rng(0).normal(size=labels.shape), dtype=torch.float32)
    official = zero_shot("official", labels, scores)
    stderr = capsys.readouterr().err
    probabilities = torch.sigmoid(scores).numpy()

    y = np.where(labels == MISSING, 0, np.where(labels == UNCERTAIN, -1, labels)).astype(float)  # the loaders
    expected = []
    for i in range(labels.shape[1]):  # inference/zero_shot.py, with the installed scikit-learn
        try:
            auc = roc_auc_score(y[:, i], probabilities[:, i])
        except ValueError:
            auc = 0.5
        expected.append(auc)
    expected[4] = 0.5  # one class: scikit-learn 1.4.2 (the official pin) raises; newer ones return NaN
    metrics = official.metrics
    got = [metrics[f"zero_shot_auroc/finding{k}"] for k in range(5)]
    assert got == pytest.approx(expected) and got[1] == 0.5 and got[4] == 0.5
    assert metrics["zero_shot_auroc_macro"] == pytest.approx(np.mean(expected))
    assert metrics["zero_shot_population"] == "official" and metrics["zero_shot_findings_scored"] == 3
    fallbacks = metrics["zero_shot_auroc_official_fallbacks"]
    assert set(fallbacks) == {"finding1", "finding2", "finding3", "finding4"}
    assert "multiclass" in fallbacks["finding1"] and "one class" in fallbacks["finding4"]
    assert "absent (0) against uncertain (-1)" in fallbacks["finding3"]
    assert "population=official" in stderr and "finding1" in stderr and "greenlab WARNING" in stderr
    assert [row.n_test for row in official.comparisons] == [8] * 5  # every held-out study

    labelled = zero_shot("labelled", labels, scores).metrics
    known = labels[:, 0] >= 0
    assert labelled["zero_shot_auroc/finding0"] == pytest.approx(
        roc_auc_score(labels[known, 0].numpy(), probabilities[known.numpy(), 0])
    )
    assert (
        np.isnan(labelled["zero_shot_auroc/finding2"])
        and labelled["zero_shot_auroc_official_fallbacks"] == {}
    )
    assert labelled["zero_shot_findings_scored"] == 2
    assert labelled["zero_shot_auroc/finding0"] != pytest.approx(got[0])  # unmentioned as absent changes it


def composed(experiment: str, *overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={experiment}", *overrides])


@pytest.mark.parametrize("experiment", ["greenrfm", "greenrfm_lite", "greenrfm_stage1_medmnist3d"])
def test_fp32_as_the_official_scripts(experiment):
    """No autocast / GradScaler in training/supervise_pretrain.py, training/alignment.py, inference/zero_shot.py:
    fp32 on a GPU too (trainer=gpu is bf16-mixed elsewhere)."""
    for scale in (["scale=paper"], []):  # and the experiment's own (demo) scale
        cfg = composed(experiment, *scale, "trainer=gpu")
        assert cfg.trainer.precision == "32-true", (experiment, scale)
        if experiment != "greenrfm_stage1_medmnist3d":
            assert cfg.evaluation.bf16 is False and cfg.evaluation.linear_probe.bf16 is False


def test_paper_scale_with_the_weights_given_is_faithful():
    """The official values are the configs' at scale=paper: no deviation once the weights are had."""
    weights = [
        "backbone.weights=/w/r3d_18-b3b3357e.pth",
        "text_encoder.weights=/w/BiomedVLP-CXR-BERT-specialized",
        "trainer=gpu",  # the paper command: fp32 on the GPU all the same
    ]
    loaded = {"requested": "/w/x", "used": "file", "source": "/w/x", "note": None}
    for experiment in ("greenrfm", "greenrfm_lite"):
        result = check(experiment, weights, {"image": loaded, "text": {**loaded, "used": "pretrained"}})
        assert result == {"faithful": True, "deviations": []}, experiment
    assert check("greenrfm_stage1_medmnist3d", ["backbone.weights=/w/r3d_18.pth", "trainer=gpu"], loaded)[
        "faithful"
    ]
    cfg = composed("greenrfm", "scale=paper")
    assert (cfg.objective.uncertain, cfg.objective.unmentioned, cfg.objective.lr_interval) == (
        "target",
        "negative",
        "step",
    )
    assert cfg.objective.stage1.weight_decay_on == "all" and cfg.evaluation.population == "official"
    # greenlab's masking, an override: named with both values
    found = check("greenrfm", [*weights, "objective.uncertain=mask"], {"image": loaded, "text": loaded})
    assert found["deviations"] == [
        {"key": "objective.uncertain", "paper": "target", "used": "mask", "why": "override"}
    ]


def test_the_demo_lists_its_label_masking_and_zero_shot_population():
    """The demo keeps greenlab's masking (it learns with it: demo_greenrfm.yaml) and the labelled population;
    results.json lists both as deviations from scale=paper."""
    deviations = {d["key"]: d for d in check("greenrfm", [], {"image": {"used": "file"}, "text": {"used": "file"}},
                                             scale="demo_greenrfm")["deviations"]}  # fmt: skip
    for key, paper, used in (("evaluation.population", "official", "labelled"),
                             ("objective.uncertain", "target", "mask"), ("objective.unmentioned", "negative", "mask")):  # fmt: skip
        assert deviations[key] == {"key": key, "paper": paper, "used": used, "why": "scale=demo"}
    assert "objective.lr_interval" not in deviations and "objective.stage1.weight_decay_on" not in deviations
