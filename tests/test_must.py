"""GreenRFM / MUST: the stage-2 loss, the stage switch (stage 2 starts from stage 1's encoders), loading
stage-1 weights from an earlier run, the text encoder's initialisations, zero-shot and retrieval metrics."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from greenlab.config import build
from greenlab.data.base import Task
from greenlab.evaluation.zero_shot import prompts, recall_at
from greenlab.objectives.must import MUST, STAGE1_FILES, AlignedEncoders, symmetric_contrastive_loss
from tests.conftest import TINY_GREENRFM, run_cli

# its module-scoped runs are made once: `make test` (pytest-xdist --dist loadgroup) keeps the file on one worker
pytestmark = pytest.mark.xdist_group("must")

TINY_TEXT = {"vocab_size": 200, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_length": 64}
TINY_CT = {"spacing": (20.0, 20.0, 30.0), "pad_size": (16, 16, 10), "crop_size": (16, 16, 8)}


def tiny_image_encoder():
    return build("backbone/resnet3d18", depth=10, stem_kernel=4)


def tiny_text_encoder(**arguments):
    return build("text_encoder/random_bert", **{**TINY_TEXT, **arguments})


def tiny_must(**kwargs) -> MUST:
    """objective/must.yaml with tiny encoders; a dict argument (stage1, stage2) changes only the keys it names."""
    torch.manual_seed(0)
    changes = [
        f"objective.{k}.{key}={value}"
        for k, v in kwargs.items()
        if isinstance(v, dict)
        for key, value in v.items()
    ]
    arguments = {k: v for k, v in kwargs.items() if not isinstance(v, dict)}
    return build("objective/must", overrides=changes, image_encoder=tiny_image_encoder(),
                 text_encoder=tiny_text_encoder(), latent_dim=16, **arguments)  # fmt: skip


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded_ct")
    # the findings the reports label (the demo's drop: the stage-1-heads start needs a latent >= the findings)
    data = build("data/embedded_ct", root=str(root / "gen"), num_volumes=24, pair_reports=True, cache_dir=None, held_out_fraction=0.2,
                 unlabelled_findings="drop",
                 num_text_only_reports=0, batch_size=6, eval_batch_size=6, num_workers=0,
                 output_dir=str(root / "run"), **TINY_CT)  # fmt: skip
    data.setup("fit")
    return data


def test_symmetric_contrastive_loss_is_the_mean_of_both_cross_entropies():
    torch.manual_seed(0)
    u, v = torch.randn(5, 8), torch.randn(5, 8)
    s = u @ v.t()
    expected = (F.cross_entropy(s, torch.arange(5)) + F.cross_entropy(s.t(), torch.arange(5))) / 2
    assert torch.allclose(symmetric_contrastive_loss(u, v), expected)
    aligned = torch.eye(5) * 20  # un-normalised: large matching dot products -> loss near 0
    assert symmetric_contrastive_loss(aligned, aligned) < 1e-6


def test_uncertain_labels_are_kept_masked_or_mapped():
    """labels 1, 0, UNCERTAIN (-2), MISSING (-1) -> (targets, known); the official coding by default."""
    labels = torch.tensor([[1, 0, -2, -1]])

    def coded(**options):  # None: masked
        targets, known = tiny_must(**options).targets(labels)
        return [t if k else None for t, k in zip(targets[0].tolist(), known[0].tolist())]

    assert coded() == [1, 0, -1, 0]  # official: -1 a BCE target, unmentioned 0 (data/ct_rate.py)
    assert coded(uncertain="mask", unmentioned="mask") == [1, 0, None, None]  # greenlab
    assert coded(uncertain="positive") == [1, 0, 1, 0] and coded(uncertain="negative") == [1, 0, 0, 0]
    assert coded(unmentioned="mask") == [1, 0, -1, None]
    with pytest.raises(ValueError, match="unmentioned"):
        tiny_must(unmentioned="absent")


class StageProbe(L.Callback):
    """Copies of the weights (and optimiser state size) when each epoch's first batch starts."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.seen[trainer.current_epoch] = {
                "image_encoder": {k: v.clone() for k, v in module.image_encoder.state_dict().items()},
                "image_head": module.image_head.weight.clone(),
                "projection": module.aligned.image_projection.weight.clone(),
                "optimizer_state": len(trainer.optimizers[0].state),
                "weight_decay": {g["weight_decay"] for g in trainer.optimizers[0].param_groups},
            }


def test_stage_two_starts_from_the_saved_stage_one_encoders(ct_data, tmp_path):
    objective, probe = tiny_must(stage1_epochs=1), StageProbe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path), callbacks=[probe])  # fmt: skip
    trainer.fit(objective, datamodule=ct_data)
    saved = torch.load(tmp_path / STAGE1_FILES["image_encoder"])
    stage1, stage2 = probe.seen[0], probe.seen[1]
    for key, value in saved.items():  # stage 2's first step sees exactly the saved stage-1 encoder
        assert torch.equal(stage2["image_encoder"][key], value), key
    assert any(not torch.equal(stage1["image_encoder"][k], saved[k]) for k in saved)  # stage 1 trained it
    assert torch.equal(stage1["projection"], stage2["projection"])  # projections wait for stage 2
    assert not torch.equal(stage2["projection"], objective.aligned.image_projection.weight)
    assert torch.equal(stage2["image_head"], objective.image_head.weight)  # stage-1 heads left alone
    assert stage2["optimizer_state"] == 0  # a fresh AdamW for stage 2
    assert stage1["weight_decay"] == {1e-4} and stage2["weight_decay"] == {
        0.0
    }  # official: on every parameter in stage 1 (supervise_pretrain.py), none in stage 2
    assert (tmp_path / STAGE1_FILES["text_encoder"]).is_file() and (tmp_path / "text_tokenizer").is_dir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        objective.save_stage1(tmp_path)


def test_stage_two_can_start_from_the_stage_one_heads(ct_data, tmp_path):
    """start=stage1_heads: latent coordinate k holds finding k's stage-1 logit (bias aside) on both sides and
    the shared classifier reads it back, from stage 2's first step."""
    objective, probe = tiny_must(stage1_epochs=1, stage2={"start": "stage1_heads"}), StageProbe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path), callbacks=[probe])  # fmt: skip
    trainer.fit(objective, datamodule=ct_data)
    c = len(ct_data.tasks)
    assert torch.equal(probe.seen[1]["projection"][:c], probe.seen[1]["image_head"])
    assert not torch.equal(probe.seen[0]["projection"][:c], probe.seen[1]["projection"][:c])

    aligned, image_head, text_head = objective.aligned, objective.image_head, objective.text_head
    aligned.anchor_to_heads(image_head, text_head)
    shift = 0.5 * (text_head.bias - image_head.bias)
    with torch.no_grad():
        f, g = torch.randn(4, image_head.in_features), torch.randn(4, text_head.in_features)
        u, v = aligned.image_projection(f), aligned.text_projection(g)
        assert torch.allclose(u[:, :c], image_head(f) - image_head.bias, atol=1e-6)
        assert torch.allclose(aligned.classifier(u), image_head(f) + shift, atol=1e-5)
        assert torch.allclose(aligned.classifier(v), text_head(g) - shift, atol=1e-5)
    with pytest.raises(ValueError, match="stage2.start"):
        tiny_must(stage2={"start": "heads"})


def test_learning_rates_per_part_and_stage(ct_data):
    objective = tiny_must(stage1_epochs=2, stage1={"lr": 1e-3, "text_lr": 5e-4, "min_lr": 1e-5},
                          stage2={"lr": 2e-4, "classifier_lr": 2e-3, "min_lr": 2e-5}, lr_interval="epoch")  # fmt: skip
    objective.build(ct_data.tasks, ct_data.train_reports)
    objective.trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False)
    configured = objective.configure_optimizers()
    groups = configured["optimizer"].param_groups
    factors = configured["lr_scheduler"]["scheduler"].lr_lambdas

    def lr(epoch, module):
        wanted = {id(p) for p in module.parameters()}
        return next(f(epoch) for g, f in zip(groups, factors) if g["params"] and id(g["params"][0]) in wanted)

    image, text, classifier = objective.image_encoder, objective.text_encoder, objective.aligned.classifier
    assert lr(0, image) == pytest.approx(1e-3) and lr(0, text) == pytest.approx(5e-4)  # stage 1 starts
    assert lr(2, image) == pytest.approx(2e-4) and lr(2, text) == pytest.approx(2e-4)  # stage 2 starts
    assert lr(2, classifier) == pytest.approx(2e-3)
    assert lr(3, image) < 2e-4 and lr(3, classifier) == pytest.approx(10 * lr(3, image))  # same cosine


class StepProbe(L.Callback):
    """Per optimiser step: the lr and weight decay of every group, and which parameters each group holds."""

    def __init__(self):
        self.lrs, self.decays = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.lrs.append([g["lr"] for g in groups])
        self.decays.append([g["weight_decay"] for g in groups])


def test_official_schedule_and_weight_decay_per_iteration(ct_data, tmp_path):
    """Paper values: stage 1 is torch's CosineAnnealingLR(T_max = epochs x batches, eta_min 1e-6) stepped per
    batch with weight decay 1e-4 on every parameter (supervise_pretrain.py); stage 2 a constant 1e-5 without
    weight decay (alignment.py: no scheduler, wd 0.0)."""
    objective, probe = tiny_must(stage1_epochs=2), StepProbe()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path), callbacks=[probe])  # fmt: skip
    trainer.fit(objective, datamodule=ct_data)
    per_epoch = trainer.num_training_batches
    assert per_epoch >= 2 and len(probe.lrs) == 3 * per_epoch
    groups = trainer.optimizers[0].param_groups
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in objective.parameters())  # every parameter, once

    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4, weight_decay=1e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=2 * per_epoch, eta_min=1e-6)
    official = []
    for _ in range(2 * per_epoch):
        official.append(reference.param_groups[0]["lr"])
        reference.step()
        cosine.step()
    for step in (0, 1, per_epoch - 1, per_epoch, 2 * per_epoch - 1):  # across the first epoch boundary
        assert probe.lrs[step] == pytest.approx([official[step]] * len(groups), rel=1e-9, abs=1e-15), step
    assert len({round(lr[0], 12) for lr in probe.lrs[:per_epoch]}) == per_epoch  # a new lr every step
    assert all(set(d) == {1e-4} for d in probe.decays[: 2 * per_epoch])  # matrices, biases and norms alike
    assert all(lr == pytest.approx([1e-5] * len(groups)) for lr in probe.lrs[2 * per_epoch :])
    assert all(set(d) == {0.0} for d in probe.decays[2 * per_epoch :])
    assert objective.run_notes()["stage1_subset"].startswith("every training study; official")


def test_projections_start_latents_near_unit_norm():
    """Un-normalised dot products: latents of norm ~1 give the contrastive softmax a start near log(B)."""
    torch.manual_seed(0)
    image, text = tiny_image_encoder(), tiny_text_encoder()
    aligned = AlignedEncoders(image, text, latent_dim=768, num_findings=3, projection_init="unit_norm")
    features = torch.randn(64, image.num_features)  # mean square 1
    norms = aligned.image_projection(features).norm(dim=1)
    assert 0.9 < norms.mean() < 1.1


def test_stage_two_starts_as_the_official_code_by_default():
    """SadVoxel/GreenRFM: projections and classifier from PyTorch's default init; AdamW weight decay 0 in stage 2."""
    torch.manual_seed(0)
    aligned = AlignedEncoders(tiny_image_encoder(), tiny_text_encoder(), latent_dim=768, num_findings=3)
    weight = aligned.image_projection.weight.detach()  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
    assert weight.abs().max() <= 512**-0.5 and weight.std() == pytest.approx((3 * 512) ** -0.5, rel=0.05)
    objective = build("objective/must", image_encoder=tiny_image_encoder(), text_encoder=tiny_text_encoder())
    assert (
        objective.settings["stage2"]["weight_decay"] == 0.0
        and objective.settings["stage2"]["start"] == "random"
    )


def test_text_only_reports_join_the_text_encoders_stage1_batches(tmp_path):
    root = tmp_path / "gen"
    data = build("data/embedded_ct", root=str(root), num_volumes=12, num_text_only_reports=30, text_only_batch_size=4,
                 pair_reports=True, batch_size=4, num_workers=0, cache_dir=None, held_out_fraction=0.2,
                 output_dir=str(tmp_path / "run"),
                 **TINY_CT)  # fmt: skip
    data.setup("fit")
    assert len(data.text_only_set) == 30 and data.describe()["text_only_reports"] == 30
    labelled = pd.read_csv(tmp_path / "run" / "text_only_report_labels.csv")
    report, labels = data.text_only_set[0]
    assert report == labelled["report"][0] and labels.shape == (len(data.tasks),)
    batch, _, _ = next(iter(data.train_dataloader()))  # a CombinedLoader yields (batch, index, loader index)
    assert len(batch["paired"][1]) == 4 and len(batch["text_only"][0]) == 4
    seen = []
    objective = tiny_must(stage1_epochs=1)
    objective.build(data.tasks, data.train_reports)
    original = objective.text_encoder.forward
    objective.text_encoder.forward = lambda texts: seen.append(list(texts)) or original(texts)
    objective.trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False)  # current_epoch 0: stage 1
    objective.log = objective.log_dict = lambda *args, **kwargs: None  # outside a fit loop
    objective.training_step(batch, 0)
    assert seen[-1] == list(batch["paired"][1]) + list(batch["text_only"][0])


def test_stage1_weights_of_an_earlier_run_are_loaded(ct_data, tmp_path):
    first = tiny_must()
    first.build(ct_data.tasks, ct_data.train_reports)
    with torch.no_grad():
        for part in (first.image_encoder, first.image_head, first.text_head):
            for p in part.parameters():
                p.add_(1.0)
    first.save_stage1(tmp_path)
    second = tiny_must(stage1_weights=str(tmp_path))
    second.build(ct_data.tasks, ct_data.train_reports)
    assert second.stage1_epochs == 0 and second.stage == "stage2"
    for part in ("image_encoder", "image_head", "text_head"):
        for (name, a), b in zip(
            getattr(first, part).state_dict().items(), getattr(second, part).state_dict().values()
        ):
            assert torch.equal(a, b), f"{part}.{name}"
    texts = ["No pleural effusion.", "Cardiomegaly."]
    assert (
        first.text_encoder.tokenizer(texts)["input_ids"] == second.text_encoder.tokenizer(texts)["input_ids"]
    )
    with pytest.raises(FileNotFoundError, match="stage1_image_encoder.pth"):
        tiny_must(stage1_weights=str(tmp_path / "nowhere")).build(ct_data.tasks, ct_data.train_reports)


def test_text_encoder_from_a_local_folder_and_loud_fallback(tmp_path, capsys):
    fitted = tiny_text_encoder()
    fitted.fit_vocabulary(["no pleural effusion", "there is a small nodule"] * 5)
    fitted.model.save_pretrained(tmp_path / "bert")
    fitted.save_tokenizer(tmp_path / "bert")
    local = build("text_encoder/pretrained", weights=str(tmp_path / "bert"))
    assert local.init_record["used"] == "pretrained" and not local.needs_vocabulary
    assert torch.allclose(local.eval()(["no nodule"]), fitted.eval()(["no nodule"]), atol=1e-6)
    missing = build("text_encoder/pretrained", **{**TINY_TEXT, "weights": "no-such-org/no-such-bert"})
    assert missing.init_record["used"] == "random" and missing.needs_vocabulary
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err


def test_prompts_and_recall():
    positive, negative = prompts("pleural_effusion", [("There is {finding}.", "{Finding} is absent.")])
    assert positive == ["There is pleural effusion."] and negative == ["Pleural effusion is absent."]
    pairs = [("There is {finding}.", "No {finding}."), ("{Finding} is present.", "{Finding} is absent.")]
    positive, negative = prompts("lung_nodule", pairs, ("nodule", "nodules"))
    assert positive == ["There is nodule.", "Nodule is present.", "There is nodules.", "Nodules is present."]
    assert negative[1::2] == ["Nodule is absent.", "Nodules is absent."]
    similarity = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]])  # ranks of own: 1, 2, 1
    assert recall_at(similarity, (1, 2)) == {"recall@1": 2 / 3, "recall@2": 1.0}


class OracleModel(torch.nn.Module):
    """Image latent = the volume's labels; a prompt's latent = +/- the one-hot of its finding."""

    def __init__(self, names):
        super().__init__()
        self.names = names

    def forward(self, volumes):
        return volumes

    def encode_text(self, texts):
        out = torch.zeros(len(texts), len(self.names))
        for i, text in enumerate(texts):
            for k, name in enumerate(self.names):
                if name.replace("_", " ") in text.lower():
                    out[i, k] = -1.0 if " no " in f" {text.lower()}" or "not" in text else 1.0
            if text.startswith("report"):
                out[i] = self.reports[int(text.split()[1])]
        return out


def test_zero_shot_scores_an_oracle_perfectly():
    names = ["pleural_effusion", "lung_nodule"]
    labels = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, -2]])
    volumes = labels.float().clamp(min=0) * 2 - 1  # +1 present, -1 absent
    model = OracleModel(names)
    model.reports = volumes + torch.eye(5, 2) * 0.1  # each report is closest to its own volume
    loader = torch.utils.data.DataLoader(list(zip(volumes, labels)), batch_size=2)

    class Data:
        dataset_name = "oracle"
        tasks = [Task(n, 2) for n in names]
        test_reports = [f"report {i}" for i in range(5)]

        def probe_dataloaders(self):
            return None, loader

        def held_out_ids(self):
            return [f"study{i}" for i in range(5)]

    encoded, encode_text = [], model.encode_text
    model.encode_text = lambda texts: encoded.append(tuple(texts)) or encode_text(texts)
    metrics = build("evaluation/zero_shot", linear_probe=None, vocabulary=None, population="labelled")(
        model, Data(), torch.device("cpu")
    ).metrics
    assert encoded.count(("There is no Pleural effusion.",)) == 1, (
        "the configured templates, p3 over the names in sentence case, are not scored twice"
    )
    assert metrics["zero_shot_auroc/pleural_effusion"] == 1.0 and metrics["zero_shot_auroc_macro"] == 1.0
    assert metrics["zero_shot_findings_scored"] == 2 and metrics["report_to_volume_recall@5"] == 1.0
    by_prompt = metrics["zero_shot_auroc_macro_by_prompt"]  # each official pair, and the five averaged
    assert list(by_prompt) == ["p1", "p2", "p3", "p4", "p5", "p1-p5 averaged"]
    assert by_prompt["p3"] == metrics["zero_shot_auroc_macro"]  # the configured templates are [p3]
    assert metrics["prompt_finding_case"] == "sentence"
    assert metrics["report_to_volume_chance@1"] == 0.2 and metrics["report_to_volume_chance@10"] == 1.0


@pytest.fixture(scope="module")
def greenrfm_run(tmp_path_factory, data_dir):
    """The greenrfm main command at a tiny size (its run folder)."""
    run = tmp_path_factory.mktemp("greenrfm") / "run"
    run_cli("+experiment=greenrfm", *TINY_GREENRFM, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}")
    return run


def test_zero_shot_predictions_reproduce_the_reported_aurocs(greenrfm_run):
    """predictions.csv's zero-shot rows (the studies of the scored population) give each finding's AUROC."""
    from greenlab.analysis import recompute
    from greenlab.results.model import Results

    results = Results.from_folder(greenrfm_run)
    rows = {
        r["task"]: r["auroc"] for r in recompute.recompute(greenrfm_run) if r["evaluation"] == "zero_shot"
    }
    reported = {k.split("/", 1)[1]: v for k, v in results.metrics.items() if k.startswith("zero_shot_auroc/")}
    finite = {k: v for k, v in reported.items() if v is not None}  # results.json: NaN as null
    assert finite and {k: rows[k] for k in finite} == pytest.approx(finite)


def test_greenrfm_main_command_end_to_end(greenrfm_run):
    """reports -> labels -> stage 1 -> stage 2 -> zero-shot, from the main command at a tiny size."""
    run = greenrfm_run
    results = json.loads((run / "results.json").read_text())
    metrics = results["metrics"]
    for key in (
        "zero_shot_auroc_macro",
        "report_to_volume_recall@1",
        "report_to_volume_recall@10",
        "probe_auroc_macro",
    ):
        assert key in metrics, key
    assert results["data"]["labels_from"].startswith("reports") and results["objective"]["stage1_epochs"] == 1
    assert results["init"]["text"]["used"] == "random" and "vocabulary of" in results["init"]["text"]["note"]
    assert json.loads((run / "backbone.json").read_text())["factory"].endswith("AlignedEncoders")
    for name in ("report_labels.csv", *STAGE1_FILES.values(), "text_tokenizer"):
        assert (run / name).exists(), name
    readable = (run / "results.md").read_text()  # the figures a user reads, beside results.json
    assert f"**{metrics['zero_shot_auroc_macro']:.3f}** [95% CI" in readable and "Recall@10" in readable
    # offline: no Kinetics-400 weights for the image encoder (recorded, not hidden), a fitted random BERT
    assert (
        "image **random** — no published weights for 3D ResNet-10" in readable
    )  # the tiny encoder (r3d_18: Kinetics)
    assert "text **random** — microsoft/BiomedVLP-CXR-BERT-specialized is not in the local cache" in readable
    assert "; vocabulary of" in readable  # CXR-BERT not cached: the fitted random BERT


def test_greenrfm_same_seed_same_results(greenrfm_run, tmp_path, data_dir):
    """Determinism on CPU: random crops (MONAI), vocabulary ids and text-only draws repeat with the seed."""
    run = tmp_path / "again"
    run_cli("+experiment=greenrfm", *TINY_GREENRFM, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}")
    metrics = [json.loads((r / "results.json").read_text())["metrics"] for r in (greenrfm_run, run)]
    for key in (
        "final_train_loss",
        "zero_shot_auroc_macro",
        "probe_auroc_macro",
        "report_to_volume_recall@1",
    ):
        assert metrics[0][key] == metrics[1][key], key


def test_retrieval_ranks_by_cosine_when_latents_have_unequal_norms():
    """The official report_to_volume.py L2-normalises reports and volumes; zero-shot keeps raw dot products."""
    reports = np.array([[1.0, 0.0], [0.0, 1.0]])
    volumes = np.array([[1.0, 0.1], [10.0, 5.0]])  # volume 1 has the larger norm
    cosine = build("evaluation/zero_shot", linear_probe=None)
    assert cosine.retrieval_similarity == "cosine"
    assert recall_at(cosine.similarity(reports, volumes), (1,)) == {"recall@1": 1.0}
    dot = build("evaluation/zero_shot", linear_probe=None, retrieval_similarity="dot")
    assert recall_at(dot.similarity(reports, volumes), (1,)) == {"recall@1": 0.5}  # report 0 picks volume 1


def test_official_prompt_pairs_are_selectable_by_name():
    """SadVoxel/GreenRFM inference/zero_shot.py: p1-p5; inference/run_zero_shot.py runs p3 (its --prompt
    default) over CT_PATHOLOGIES, the names in sentence case ("Arterial wall calcification")."""
    from greenlab.evaluation.zero_shot import prompt_pairs

    zero_shot = build("evaluation/zero_shot", linear_probe=None)
    assert zero_shot.templates == [("There is {finding}.", "There is no {finding}.")]
    assert prompts("arterial_wall_calcification", zero_shot.templates, case=zero_shot.finding_case) == (
        ["There is Arterial wall calcification."],
        ["There is no Arterial wall calcification."],
    )
    with pytest.raises(ValueError, match="finding_case"):
        prompts("lung_nodule", zero_shot.templates, case="title")
    pairs = prompt_pairs(["p2", "p5", ["A {finding}.", "No {finding}."]])
    assert pairs[1] == (
        "Findings are compatible with {finding}.",
        "Findings are not compatible with {finding}.",
    )
    assert prompts("pleural_effusion", pairs[:1]) == (["pleural effusion."], [""])
    assert pairs[2] == ("A {finding}.", "No {finding}.")
    with pytest.raises(ValueError, match="p6"):
        prompt_pairs(["p6"])
