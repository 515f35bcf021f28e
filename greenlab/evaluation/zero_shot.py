"""Zero-shot diagnosis and report-to-volume retrieval with an image-text model (GreenRFM protocol).

Per finding c, each template k gives a positive and a negative prompt ("There is {finding}." / "There is no
{finding}."), {finding} being the finding's name in words ("pleural effusion") or, with ``vocabulary``, each
mention phrase the labeller's vocabulary lists for it ("pleural effusion", "pleural fluid", ...); their
text latents are averaged over templates x phrases (prompt ensembling), and

    p_c(x) = softmax(u·v⁺_c, u·v⁻_c)[0],   u = the volume's latent,

scored by AUROC per finding over ``population`` (raw dot products, as the official ``inference/zero_shot.py``):

- ``official`` (inference/zero_shot.py): every held-out study, labels as the official loaders give them (an
  unmentioned finding 0, an uncertain one -1: data/ct_rate.py ``.fillna(0.0)``), ``roc_auc_score(labels, p)`` under
  the official bare ``except: auc = 0.5``, macro = the mean over every finding. A finding whose labels hold -1, 0
  and 1 (or one class only) is not scored but reported as 0.5, and one holding -1 and 0 alone is scored with 0 as
  the positive class (scikit-learn 1.4.2, the official requirements.txt pin): the run warns loudly and results.json
  names them (``zero_shot_auroc_official_fallbacks``).
- ``labelled`` (greenlab): the held-out volumes labelled present / absent for c (uncertain and missing left
  out); macro = mean over findings with both classes.

Retrieval: each held-out report ranks all held-out volumes by cosine similarity (the official
``report_to_volume.py`` L2-normalises both sides; ``retrieval_similarity=dot`` ranks by u·v); Recall@K =
fraction whose own volume is in the top K. Templates are pairs of format strings or the official pairs by
name, ``OFFICIAL_PROMPTS`` p1-p5. The official entry point ``inference/run_zero_shot.py`` scores p3
(``--prompt`` default; ``ZeroShotEvaluator.evaluate``'s own default, p1, is not what it runs) over the finding
names in sentence case ("Pleural effusion", its ``CT_PATHOLOGIES``): ``finding_case=sentence``; ``plain``
fills {finding} with the name in lower-case words ("pleural effusion") or the vocabulary's phrase as written.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from greenlab.contracts import ReportsSource, TextAligned
from greenlab.data.base import MISSING, UNCERTAIN
from greenlab.evaluation.linear_probe import LinearProbe
from greenlab.results.model import MACRO, Comparison, Embedding, Evaluated, Predictions
from greenlab.warnings_banner import loud_warning

POPULATIONS = ("official", "labelled")
FINDING_CASES = ("sentence", "plain")

OFFICIAL_PROMPTS = {  # SadVoxel/GreenRFM inference/zero_shot.py
    "p1": ("{finding}.", "not {finding}."),
    "p2": ("{finding}.", ""),
    "p3": ("There is {finding}.", "There is no {finding}."),
    "p4": ("{finding} is present.", "{finding} is not present."),
    "p5": ("Findings are compatible with {finding}.", "Findings are not compatible with {finding}."),
}


def prompt_pairs(templates) -> list[tuple[str, str]]:
    """Each template as a (positive, negative) pair: a name in ``OFFICIAL_PROMPTS`` or a pair itself."""
    pairs = []
    for template in templates:
        if isinstance(template, str):
            if template not in OFFICIAL_PROMPTS:
                raise ValueError(
                    f"prompt template {template!r}: not one of {sorted(OFFICIAL_PROMPTS)} nor a pair"
                )
            template = OFFICIAL_PROMPTS[template]
        pairs.append(tuple(template))
    return pairs


def prompts(
    finding: str, templates, phrases: tuple[str, ...] = (), case: str = "plain"
) -> tuple[list[str], list[str]]:
    """(positive prompts, negative prompts) for a snake_case finding name, over ``phrases`` (default: the
    name in words) x templates; {finding} in ``case`` (plain: as written; sentence: first letter upper-case),
    {Finding} always in sentence case."""
    if case not in FINDING_CASES:
        raise ValueError(f"finding_case must be one of {FINDING_CASES}, not {case!r}")
    fills = []
    for words in phrases or [finding.replace("_", " ")]:
        sentence = words[:1].upper() + words[1:]
        fills.append({"finding": sentence if case == "sentence" else words, "Finding": sentence})
    positive = [p.format(**f) for f in fills for p, _ in templates]
    return positive, [n.format(**f) for f in fills for _, n in templates]


def recall_at(similarity: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """similarity (N reports, N volumes), report i belongs to volume i -> {"recall@K": fraction}."""
    own = np.diag(similarity)[:, None]
    rank = (similarity > own).sum(axis=1)  # 0 = the own volume ranks first
    return {f"recall@{k}": float((rank < k).mean()) for k in ks}


def official_labels(labels: np.ndarray) -> np.ndarray:
    """greenlab's codes as the official loaders give them: MISSING (unmentioned) -> 0 (``.fillna(0.0)``),
    UNCERTAIN -> -1 (kept), 1 / 0 as they are."""
    return np.where(labels == MISSING, 0, np.where(labels == UNCERTAIN, -1, labels)).astype(np.float64)


def official_auroc(y: np.ndarray, p: np.ndarray) -> tuple[float, str | None]:
    """(AUROC, why it is not a plain present-vs-absent AUROC, or None) of official labels ``y`` (1, 0, -1)
    as inference/zero_shot.py computes it: ``try: roc_auc_score(y, p) except: auc = 0.5`` with the official
    scikit-learn 1.4.2, which raises for three classes or one, and for two takes the larger one as positive
    (``label_binarize``). Written out, so the result does not depend on the installed scikit-learn."""
    classes = np.unique(y)
    if len(classes) > 2:
        return (
            0.5,
            "labels hold -1 (uncertain), 0 and 1: roc_auc_score raises (multiclass); the official except gives 0.5",
        )
    if len(classes) < 2:
        return (
            0.5,
            f"one class only ({classes.tolist()}): roc_auc_score raises; the official except gives 0.5",
        )
    value = float(roc_auc_score(y == classes[1], p))
    if classes[0] == -1:
        positive = (
            "present (1) against uncertain (-1)" if classes[1] == 1 else "absent (0) against uncertain (-1)"
        )
        return value, f"labels hold -1 and {int(classes[1])} only: scored as {positive}"
    return value, None


def finding_auroc(y: np.ndarray, p: np.ndarray, population: str) -> tuple[float, str | None]:
    """One finding's AUROC over ``population`` of greenlab-coded labels ``y`` (``official_auroc``'s note)."""
    if population == "official":
        return official_auroc(official_labels(y), p)
    known = y >= 0
    if len(np.unique(y[known])) != 2:
        return float("nan"), None
    return float(roc_auc_score(y[known], p[known])), None


def macro_auroc(labels: np.ndarray, scores: np.ndarray, population: str = "labelled") -> float:
    """``labelled``: mean AUROC over the columns with both classes among their labelled (>= 0) rows, NaN if
    none; ``official``: the mean over every column of ``official_auroc``."""
    values = [finding_auroc(y, p, population)[0] for y, p in zip(labels.T, scores.T)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _mean(scores: dict) -> float:
    valid = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(valid)) if valid else float("nan")


class ZeroShot:
    """Args: templates (official pair names p1-p5, or pairs of format strings with {finding} / {Finding}),
    finding_case (sentence | plain: how {finding} is written),
    population (official | labelled: the held-out studies and labels each finding's AUROC is over),
    vocabulary (a labeller vocabulary, name or YAML: its mention phrases fill {finding}; None: the finding
    names), retrieval_similarity (cosine | dot), linear_probe (also probe the frozen image latents with
    labels, as a supervised reference), bootstrap (resamples of the held-out volumes for a 95 % interval of
    the macro AUROC), bf16 (autocast on GPU), seed."""

    requires = (ReportsSource,)
    described_once = LinearProbe.described_once  # its linear probes' metrics are among its own
    optimized_metric = "zero_shot_auroc_macro"

    def __init__(self, templates: list, finding_case: str, vocabulary: str | None, retrieval_similarity: str,
                 population: str, linear_probe: LinearProbe | None, bootstrap: int, bf16: bool,
                 subgroups: list[str], seed: int = 42):  # fmt: skip
        self.subgroups = list(subgroups or [])  # metadata columns scored per value (evaluation/subgroups.py)
        if retrieval_similarity not in ("cosine", "dot"):
            raise ValueError(f"retrieval_similarity must be cosine or dot, not {retrieval_similarity!r}")
        if population not in POPULATIONS:
            raise ValueError(f"population must be one of {POPULATIONS}, not {population!r}")
        if finding_case not in FINDING_CASES:
            raise ValueError(f"finding_case must be one of {FINDING_CASES}, not {finding_case!r}")
        self.population, self.finding_case = population, finding_case
        self.templates, self.retrieval_similarity = prompt_pairs(templates), retrieval_similarity
        self.phrases = {}
        if vocabulary:
            from greenlab.labels.vocabulary import load_vocabulary

            self.phrases = {f.name: f.mentions for f in load_vocabulary(vocabulary).findings}
        self.linear_probe, self.bootstrap, self.seed, self.bf16 = linear_probe, bootstrap, seed, bf16

    def bootstrap_ci(self, labels: np.ndarray, scores: np.ndarray) -> list[float] | None:
        """2.5th and 97.5th percentiles of the macro AUROC over resamples of the held-out volumes."""
        rng = np.random.default_rng(self.seed)
        resamples = (rng.integers(0, len(labels), len(labels)) for _ in range(self.bootstrap))
        draws = np.array([macro_auroc(labels[i], scores[i], self.population) for i in resamples])
        draws = draws[~np.isnan(draws)]
        return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws.size else None

    @torch.no_grad()
    def __call__(self, model, datamodule, device: torch.device) -> Evaluated:
        """model: an image-text model (``TextAligned``); datamodule: its probe-test set and ``test_reports``.
        One ``Comparison`` per finding (the point AUROC; no resamples), after the linear probes' own."""
        if not isinstance(model, TextAligned):
            raise TypeError(
                f"zero-shot diagnosis needs an image-text model (encode_text); got {type(model).__name__}"
            )
        probed = self.linear_probe(model, datamodule, device) if self.linear_probe else Evaluated({})
        was_training = model.training
        model.eval().to(device)
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=self.bf16 and device.type == "cuda"
        )
        _, test_loader = datamodule.probe_dataloaders()
        latents, labels, seconds = [], [], 0.0
        with autocast:
            for volumes, batch_labels in tqdm(test_loader, desc="zero-shot: volumes", unit="batch"):
                start = time.perf_counter()
                latents.append(model(volumes.to(device)).float().cpu())
                seconds += time.perf_counter() - start
                labels.append(batch_labels)
            image = torch.cat(latents).numpy()
            labels = torch.cat(labels).numpy()
            reports = model.encode_text(datamodule.test_reports).float().cpu().numpy()
            scores, probabilities, fallbacks = self.diagnose(
                model, image, labels, datamodule.tasks, self.templates
            )
            choices = {name: prompt_pairs([name]) for name in OFFICIAL_PROMPTS}
            choices["p1-p5 averaged"] = prompt_pairs(OFFICIAL_PROMPTS)
            by_prompt = {  # the configured templates (the paper's: [p3]) are not scored twice
                name: scores
                if pairs == self.templates
                else self.diagnose(model, image, labels, datamodule.tasks, pairs)[0]
                for name, pairs in choices.items()
            }
        model.train(was_training)
        if fallbacks:
            loud_warning(
                f"zero-shot population=official: {len(fallbacks)} of {len(scores)} findings are not a present-vs-"
                "absent AUROC, as the official inference/zero_shot.py reports them (results.json "
                "zero_shot_auroc_official_fallbacks):\n"
                + "\n".join(f"{name}: {why}" for name, why in fallbacks.items())
                + "\nevaluation.population=labelled scores present against absent alone"
            )
        pool = len(image)
        at_chance = [name for name, why in fallbacks.items() if "gives 0.5" in why]
        metrics = {
            **probed.metrics,
            "zero_shot_population": self.population,
            "zero_shot_auroc_macro": _mean(scores),
            "zero_shot_auroc_macro_ci95": self.bootstrap_ci(labels, probabilities),
            "zero_shot_findings_scored": sum(not np.isnan(v) for v in scores.values()) - len(at_chance),
            "zero_shot_auroc_official_fallbacks": fallbacks,
            "zero_shot_auroc_macro_by_prompt": {name: _mean(v) for name, v in by_prompt.items()},
            **{f"zero_shot_auroc/{name}": value for name, value in scores.items()},
            **{f"report_to_volume_{k}": v for k, v in recall_at(self.similarity(reports, image)).items()},
            "retrieval_similarity": self.retrieval_similarity,
            "retrieval_pool_size": pool,
            **{f"report_to_volume_chance@{k}": min(k, pool) / pool for k in (1, 5, 10)},
            "prompt_templates": [list(t) for t in self.templates],
            "prompt_finding_case": self.finding_case,
            "prompt_phrases": {
                t.name: list(self.phrases.get(t.name, ())) or [t.name] for t in datamodule.tasks
            },
        }
        embedding = Embedding(
            dim=int(image.shape[1]),
            dtype="float32",
            bytes_per_image=int(image.shape[1]) * 4,
            pooling="image latent (projection of the pooled 3D features)",
            throughput_img_s=len(image) / seconds if seconds else float("nan"),
            throughput_method=f"image encoder + projection (no data loading), {device.type}",
        )
        known = labels >= 0 if self.population == "labelled" else np.ones(labels.shape, dtype=bool)
        ids = np.asarray(datamodule.held_out_ids(), dtype=str)
        predictions = [Predictions("zero_shot", datamodule.dataset_name, task.name, ["0", "1"], ids[known[:, k]],
                                   labels[known[:, k], k], np.stack([1 - probabilities[:, k], probabilities[:, k]], 1)[known[:, k]])
                       for k, task in enumerate(datamodule.tasks)]  # fmt: skip
        rows = [Comparison("zero_shot", datamodule.dataset_name, name, MACRO, value, auroc_point=value,
                           n_test=int(known[:, k].sum()))
                for k, (name, value) in enumerate(scores.items())]  # fmt: skip
        return Evaluated(metrics, probed.comparisons + rows, probed.held_out, embedding,
                         probed.predictions + predictions)  # fmt: skip

    def diagnose(
        self, model, image: np.ndarray, labels: np.ndarray, tasks, templates
    ) -> tuple[dict, np.ndarray, dict]:
        """({finding: AUROC}, (N, findings) probabilities, {finding: why its AUROC is not a plain present-vs-
        absent one (population=official)}) of the zero-shot rule with these prompt pairs."""
        scores, probabilities, fallbacks = {}, np.zeros(labels.shape), {}
        for k, task in enumerate(tasks):
            positive, negative = prompts(
                task.name, templates, self.phrases.get(task.name, ()), self.finding_case
            )
            v_pos = model.encode_text(positive).float().mean(0).cpu().numpy()
            v_neg = model.encode_text(negative).float().mean(0).cpu().numpy()
            logits = np.stack([image @ v_pos, image @ v_neg], axis=1)
            probabilities[:, k] = torch.softmax(torch.from_numpy(logits), dim=1)[:, 0].numpy()
            scores[task.name], why = finding_auroc(labels[:, k], probabilities[:, k], self.population)
            if why:
                fallbacks[task.name] = why
        return scores, probabilities, fallbacks

    def similarity(self, reports: np.ndarray, volumes: np.ndarray) -> np.ndarray:
        """(N reports, N volumes) retrieval scores: cosine (both sides L2-normalised) or raw dot products."""
        if self.retrieval_similarity == "cosine":
            reports = reports / np.linalg.norm(reports, axis=1, keepdims=True).clip(1e-12)
            volumes = volumes / np.linalg.norm(volumes, axis=1, keepdims=True).clip(1e-12)
        return reports @ volumes.T

    def markdown(self, results) -> list[str]:
        """The linear probes' section (when probed), then the zero-shot table and the retrieval line."""
        m = results.metrics
        lines = self.linear_probe.markdown(results) if self.linear_probe else []
        ci = m.get("zero_shot_auroc_macro_ci95") or [math.nan, math.nan]
        probes, pool = m.get("probe_tasks", {}), m["retrieval_pool_size"]
        lines += [
            "",
            "## Zero-shot diagnosis (held-out split, prompts only)",
            "",
            "| finding | zero-shot AUROC | linear probe AUROC (supervised reference) |",
            "|---|---|---|",
        ]
        for row in results.comparisons:
            if row.evaluation == "zero_shot":
                probe = probes.get(row.task, {}).get("auroc", math.nan)
                lines.append(f"| {row.task} | {row.auroc:.3f} | {probe:.3f} |")
        population = m.get("zero_shot_population", "labelled")
        lines += [
            f"| **macro** | **{m['zero_shot_auroc_macro']:.3f}** [95% CI {ci[0]:.3f}, {ci[1]:.3f}] | "
            f"{m.get('probe_auroc_macro', math.nan):.3f} |",
            "",
            "Zero-shot population: "
            + (
                "every held-out study, unmentioned = absent, uncertain = -1, as the official inference/zero_shot.py"
                if population == "official"
                else "the held-out studies labelled present or absent per finding"
            ),
            *(
                f"- **{name}**: {why}"
                for name, why in (m.get("zero_shot_auroc_official_fallbacks") or {}).items()
            ),
            "",
            f"Report-to-volume retrieval over {pool} held-out studies: "
            + ", ".join(f"Recall@{k} {m[f'report_to_volume_recall@{k}']:.3f}" for k in (1, 5, 10))
            + " (chance "
            + ", ".join(f"{m[f'report_to_volume_chance@{k}']:.3f}" for k in (1, 5, 10))
            + ").",
            "",
            "Zero-shot macro AUROC per prompt pair (official p1-p5, and the five averaged): "
            + ", ".join(f"{n} {v:.3f}" for n, v in m["zero_shot_auroc_macro_by_prompt"].items())
            + ".",
        ]
        return lines
