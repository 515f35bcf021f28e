"""The configs: every experiment composes as it did before the contracts refactor (the snapshots), every value
has one home (the group YAML), and a bare ``python -m greenlab`` lists the experiments instead of training."""

from __future__ import annotations

import inspect

import pytest
import yaml
from hydra.utils import get_object
from omegaconf import OmegaConf

from greenlab.config import CONFIG_DIR, allows, experiments, value_rules
from tests.conftest import REPO, run_cli

SNAPSHOTS = REPO / "tests" / "config_snapshots"
# Intentional differences from the snapshots taken before the contracts refactor (issue #12) and from the
# faithfulness changes (issue #13), per dotted key: (value before, value now); None = no such key.
RULES = {"_target_": "greenlab.labels.rules.RuleLabeller", "vocabulary": "ctrate18"}
PROBE_IN_ZERO_SHOT_BEFORE = {"_target_": "greenlab.evaluation.linear_probe.LinearProbe", "pooling": "mean_all",
                             "bootstrap": 100}  # fmt: skip
PROBE_IN_ZERO_SHOT_NOW = {"_target_": "greenlab.evaluation.linear_probe.LinearProbe", "pooling": "mean_all", "C": 1.0,
                          "max_iter": 20000, "bootstrap_resamples": 100, "ci_resamples": 1000, "seed": 42,
                          "bf16": False, "preprocessing": "greenlab", "datasets": {}, "knn": None, "label_fractions": [],
                          "label_counts": [], "label_repeats": 5, "subgroups": [],
                          "embedding_map": "pca"}  # fmt: skip
DEMO_TEMPLATES = [["There is {finding}.", "There is no {finding}."], ["{Finding} is present.", "{Finding} is not present."],
                  ["Findings consistent with {finding}.", "No evidence of {finding}."]]  # fmt: skip
INTENTIONAL = {  # dotted key: the (before, now) pairs allowed
    # --- issue #12, the contracts refactor
    # the labeller is a config group with a _target_ (greenlab/conf/data/labeller/), no longer a {backend: ...} switch
    "data.labeller": [({"backend": "rules", "findings": "ctrate18"}, RULES)],
    # the zero-shot's probes compose evaluation/linear_probe.yaml: its values, once the Python defaults, now shown
    # (and, #13, fp32 embeddings as the official evaluation)
    "evaluation.linear_probe": [(PROBE_IN_ZERO_SHOT_BEFORE, PROBE_IN_ZERO_SHOT_NOW)],
    # download: the Python default before, now in text_encoder/random_bert.yaml (pretrained.yaml composes it)
    "text_encoder.download": [(None, False)],
    # --- issue #13, faithful at scale=paper (the official values; the demo keeps greenlab's where it says so)
    "evaluation.vocabulary": [
        ("${oc.select:data.labeller.findings,null}", "${oc.select:data.labeller.vocabulary,null}"),
        ("${oc.select:data.labeller.findings,null}", None),
    ],  # paper: finding names
    "evaluation.templates": [
        (DEMO_TEMPLATES, ["p3"]),
    ],  # GreenRFM's official prompt pair: p3, run_zero_shot.py's default (demo: three pairs)
    "evaluation.retrieval_similarity": [(None, "cosine")],  # official report_to_volume.py
    "evaluation.bf16": [(True, False)],  # fp32 embeddings for probes, as RETFound-Green's evaluation
    "evaluation.pooling": [("mean_patch", "fc_norm_mean_patch")],  # MAE / RETFound-MEH global-pool feature
    "backbone.no_max_pool": [(False, None)],  # torchvision r3d_18 has no max-pool (not an option)
    "backbone.weights": [("random", "cached")],  # r3d_18 starts from Kinetics-400 when cached
    "text_encoder.weights": [
        ("random", "microsoft/BiomedVLP-CXR-BERT-specialized")
    ],  # offline: loud fallback
    "data.pad_value": [(None, 0.0)],  # the official CT pad value
    "objective.stage2.projection_init": [
        (None, "unit_norm"),
        (None, "default"),
    ],  # paper: PyTorch's default init
    "objective.stage2.start": [("stage1_heads", "random")],  # paper: random (the demo keeps stage1_heads)
    "objective.stage2.weight_decay": [(0.0001, 0.0)],  # official stage 2: no weight decay
    "objective.corruption_token": [(None, "zeros")],  # RETFound-Green: zeros, never trained
    "objective.cosine_from_zero": [(None, True)],  # timm CosineLRScheduler(warmup_prefix=False)
    "backbone.spatial_dropout": [(0.1, 0.3)],  # nn-MobileNet's Dropout2d p (main.py --drop_path)
    "objective.decoder_width": [(512, 768)],  # SparK's decoder width (the demo keeps 256)
    # the greenrfm demo: the lite stem (r3d_18 without a max-pool at k=2: ~8x)
    "backbone.stem_kernel": [(2, 4)],
    # nn-MobileNet's fine-tuning recipe (main.py); the 2-epoch demo: no warm-up, mixup, CutMix or EMA
    "evaluation.epochs": [(30, 1000)],
    "evaluation.img_size": [(None, 512), (None, "${img_size}")],
    "evaluation.min_lr": [(None, 1e-06)],
    "evaluation.warmup_epochs": [(None, 20), (None, 0)],
    "evaluation.label_smoothing": [(None, 0.1)],
    "evaluation.mixup": [(None, 0.8), (None, 0.0)],
    "evaluation.cutmix": [(None, 1.0), (None, 0.0)],
    "evaluation.ema_decay": [(None, 0.9999)],
    # --- issue #14, comparisons: the paper's 100 resamples named as such, 1,000 for the interval, external probe
    # sets (data.group_column / split_column: new, null)
    "evaluation.bootstrap": [(100, None)],
    "evaluation.bootstrap_resamples": [(None, 100)],
    "evaluation.ci_resamples": [(None, 1000)],
    "evaluation.datasets": [(None, {})],
    # #15: the grid's carbon intensity by country (compute.region: new, null)
    "compute.energy_backend": [(None, "greenlab")],
    # #16: the preprocessing cache of photograph folders
    "data.pixel_cache_dir": [(None, "${paths.data_dir}/fundus_cache")],
    "compile": [(None, False)],  # torch.compile of the objective's networks, off by default
    # #24: cfg.compute is read in one place, the run's Budget (greenlab/compute/budget.py); the monitor moved to
    # greenlab/compute/; the lr rules take the global batch from the trainer, not data.batch_size
    "compute._target_": [(None, "greenlab.compute.budget.Budget")],
    "callbacks.compute_monitor._target_": [
        ("greenlab.callbacks.compute_monitor.ComputeMonitor", "greenlab.compute.monitor.ComputeMonitor")
    ],
    **{
        f"callbacks.compute_monitor.{key}": [(f"${{compute.{key}}}", None)]
        for key in ("carbon_intensity_kg_per_kwh", "pue", "cpu_watts_per_core")
    },
    "objective.batch_size": [("${data.batch_size}", None)],
    "channels_last": [(None, False)],
    # #17: SIGTERM saves last.ckpt; resuming checks the config
    "callbacks.interruption": [
        (
            None,
            {
                "_target_": "greenlab.callbacks.interruption.SaveOnInterrupt",
                "dirpath": "${paths.output_dir}/checkpoints",
            },
        )
    ],
    "resume": [(None, {"allow_config_change": False, "from": None})],
    # last.ckpt after every epoch (Lightning >= 2.5 wrote it only with an archive checkpoint, every 5-20 epochs)
    "callbacks.checkpoint.save_last": [(True, False)],
    "callbacks.latest": [
        (
            None,
            {
                "_target_": "greenlab.callbacks.interruption.LatestCheckpoint",
                "dirpath": "${paths.output_dir}/checkpoints",
            },
        )
    ],
    # the normalisation a ViT's weights expect, in its backbone config (python -m greenlab.evaluate feeds the data)
    "backbone.mean": [(None, [0.5, 0.5, 0.5]), (None, [0.485, 0.456, 0.406])],
    "backbone.std": [(None, [0.5, 0.5, 0.5]), (None, [0.229, 0.224, 0.225])],
    # SparK on any CNN (#25): its densify norm by SparK's rule (bn for nn-MobileNet, as before), AdamW as before
    "objective.densify_norm": [(None, "auto")],
    "objective.optimizer": [(None, "adamw"), (None, "lamb")],
    # 3D self-supervision (#26): a volume datamodule pairs reports exactly when the objective reads them (MUST's
    # reads_reports), not by a data value; data values reach the datamodules as plain containers
    "data.pair_reports": [(True, None)],
    "data._convert_": [(None, "all")],
    # #27, GreenRFM at scale=paper as the official code: label coding (data/ct_rate.py: unmentioned 0, -1 a BCE
    # target), stage-1 weight decay on all parameters and cosine per iteration (supervise_pretrain.py), fp32, the
    # official zero-shot population (the demo keeps greenlab's labelled one)
    "objective.uncertain": [("mask", "target"), (None, "target")],
    "objective.unmentioned": [("mask", "negative"), (None, "negative")],
    "objective.lr_interval": [(None, "step")],
    "objective.weight_decay_on": [(None, "all")],
    "objective.stage1.weight_decay_on": [(None, "all")],
    "objective.stage2.weight_decay_on": [(None, "matrices")],
    "evaluation.population": [(None, "official"), (None, "labelled")],
    # run_zero_shot.py's CT_PATHOLOGIES (sentence case); the demo's phrases as the vocabulary writes them
    "evaluation.finding_case": [(None, "sentence"), (None, "plain")],
    # data/ct_rate.py, data/merlin.py: every label column kept (greenlab dropped never-labelled findings)
    # --- issue #28, the lab evaluations: label efficiency, off unless asked for
    "evaluation.label_fractions": [(None, [])],
    "evaluation.label_counts": [(None, [])],
    "evaluation.label_repeats": [(None, 5)],
    "evaluation.subgroups": [(None, [])],
    "evaluation.embedding_map": [(None, "pca")],
    "data.metadata_columns": [(None, "${oc.select:evaluation.subgroups,[]}")],
    "evaluation.linear_probe.subgroups": [(None, [])],
    "data.unlabelled_findings": [
        (None, "keep"),
        (None, "drop"),
    ],  # the demo: drop (greenlab, with its masking)
    "trainer.precision": [
        # GreenRFM and SparK: fp32 as their official code; MAE: fp16 autocast + loss scaler on a GPU
        ("${greenlab.auto_precision:}", "32-true"),
        ("${greenlab.auto_precision:}", "${greenlab.auto_precision:16-mixed}"),
    ],
    # #27, SparK at scale=paper = SparK's ImageNet recipe (pretrain/utils/arg_util.py, lr_control.py: the BERT-style
    # paper publishes none): LAMB, batch 4096, 1600 epochs with 40 of warm-up, per-iteration lr from 0.5 % of the
    # peak to 0.1 %, no dropout while pre-training (the demo keeps SparK's AdamW path with clipping at 5)
    "objective.start_lr": [(1e-06, None)],
    "objective.min_lr": [(1e-06, None)],
    "objective.start_lr_ratio": [(None, 0.005)],
    "objective.min_lr_ratio": [(None, 0.001)],
    "objective.encoder_dropout": [(None, 0.0)],
    "data.batch_size": [(128, 4096)],
    "objective.cosine_epochs": [(200, 1600)],
    "objective.warmup_epochs": [(10, 40)],
    "trainer.max_epochs": [(200, 1600)],
    "trainer.gradient_clip_val": [(5.0, None)],
    # nn-MobileNet's fine-tuning (engine.py: clip at 1.0 every step; main.py --main_eval f1 as an option)
    "evaluation.clip_grad_norm": [(None, 1.0)],
    "evaluation.selection": [(None, "last")],
    # MAE's own augmentation (main_pretrain.py: RandomResizedCrop 0.2-1 bicubic + flip)
    "data.augmentation": [("retfound_green", "mae")],
    # #27, RETFound-Green as its notebooks: the GradScaler loop's clipping (TokenReconstructionPretraining.ipynb)
    # and the inference notebooks' resize of the raw photograph for the probes (greenlab's crop the option)
    "objective.clip": [(None, "official")],
    "evaluation.preprocessing": [(None, "greenlab"), (None, "official")],
    # #28, watching pre-training: a probe every N epochs (greenlab/callbacks/probe_monitor.py), off by default
    "callbacks.probe_monitor": [
        (None, yaml.safe_load((CONFIG_DIR / "callbacks" / "default.yaml").read_text())["probe_monitor"])
    ],
    # #29, where the 2D pre-training augmentations run (greenlab/data/device_augment.py)
    "data.augment_on": [(None, "auto")],
}


def flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if dotted in INTENTIONAL:
                out[dotted] = value
            else:
                out.update(flatten(value, dotted))
        return out
    return {prefix: node}


def composed(experiment: str, scale: str) -> dict:
    from hydra import compose, initialize_config_dir

    overrides = [f"+experiment={experiment}"] + ([] if scale == "default" else [f"scale={scale}"])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("snapshot", sorted(SNAPSHOTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_composes_as_before_the_refactor(snapshot):
    experiment, scale = snapshot.stem.split("__")
    before, now = flatten(yaml.safe_load(snapshot.read_text())), flatten(composed(experiment, scale))
    for key in sorted(set(before) | set(now)):
        if before.get(key) == now.get(key):
            continue
        assert key in INTENTIONAL, f"{snapshot.name}: {key} was {before.get(key)!r}, now {now.get(key)!r}"
        assert (before.get(key), now.get(key)) in INTENTIONAL[key], (key, before.get(key), now.get(key))


def _parameters(target) -> dict[str, inspect.Parameter]:
    """The named parameters of a function, or of a class's __init__ and, through **kwargs, its bases'."""
    if not inspect.isclass(target):
        return dict(inspect.signature(target).parameters)
    found = {}
    for cls in target.__mro__:
        if "__init__" not in vars(cls) or not cls.__module__.startswith("greenlab"):
            continue
        parameters = inspect.signature(vars(cls)["__init__"]).parameters
        found = {**parameters, **found}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return found


def _targets(node, where: str):
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str) and node["_target_"].startswith("greenlab."):
            yield where, node
        for key, value in node.items():
            yield from _targets(value, f"{where}.{key}")


def _with_inherited(path) -> dict:
    """A YAML's values over those of the configs of its group that its defaults list merges into it (``- _base``;
    not ``- name@key``, which places one under a key, nor a Hydra plugin's config)."""
    own = yaml.safe_load(path.read_text()) or {}
    inherited = {}
    for entry in own.pop("defaults", None) or []:
        base = path.parent / f"{entry}.yaml"
        if isinstance(entry, str) and not {"@", "/"} & set(entry) and base.is_file():
            inherited.update(_with_inherited(base))
    return {**inherited, **own}


def test_each_value_has_one_home():
    """A value that a group YAML sets, or inherits from a base of its group, is not restated as a default in the
    signature it configures."""
    restated = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        for where, node in _targets(_with_inherited(path), path.relative_to(CONFIG_DIR).as_posix()):
            parameters = _parameters(get_object(node["_target_"]))
            for key in node:
                if key in parameters and parameters[key].default is not inspect.Parameter.empty:
                    restated.append(f"{where}: {key} (Python default {parameters[key].default!r})")
    assert not restated, "values with two homes:\n" + "\n".join(restated)


def test_every_value_rule_is_in_the_words_its_test_reads():
    for key, rule in value_rules().items():
        assert allows(rule, None) in (True, False), key  # a rule in other words raises


def test_bare_command_lists_the_experiments_and_trains_nothing(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert all(name in proc.stdout for name in experiments()) and "+experiment=" in proc.stdout
    assert not (tmp_path / "logs").exists()


def test_trainer_default_holds_no_method_epoch_count():
    assert OmegaConf.load(CONFIG_DIR / "trainer" / "default.yaml")._get_node("max_epochs")._is_missing()


def test_a_run_without_an_epoch_count_is_refused_naming_the_key(tmp_path):
    proc = run_cli("seed=1", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "trainer.max_epochs is not set" in proc.stderr
    assert "retfound_green" in proc.stderr
