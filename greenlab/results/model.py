"""A run's results, typed: what results.json and bootstrap.npz hold, written and read by this module alone.

``Results.write(folder)`` writes results.json (``to_json``) and, when there are bootstrap draws,
bootstrap.npz, and, when the evaluation gave per-case scores, predictions.csv; ``Results.from_folder(folder)``
reads them back, results.json files from before
``schema_version`` (version 1) included. The npz keys are built and parsed here only (``NpzKeys``): the
names of datasets, tasks and classes live in results.json, the npz holds arrays by position, so any name
(one with a ``/`` too) round-trips.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MACRO = "macro"  # the comparison of a binary task, or the mean over a multi-class task's classes
SCHEMA_VERSION = 2  # 1: results.json without schema_version, bootstrap keys auroc/<dataset>/<task>/<class>

RESULTS_FILE, BOOTSTRAP_FILE, PREDICTIONS_FILE = "results.json", "bootstrap.npz", "predictions.csv"
PREDICTION_KEYS = ("evaluation", "dataset", "task", "fold", "id", "label")  # then score_<class> per class


@dataclass
class Comparison:
    """One scored comparison on held-out data: a binary task, one class of a multi-class task (one-vs-rest)
    or their macro mean (``comparison`` = MACRO). ``auroc``: the headline (the bootstrap median, else the
    point estimate); ``draws``: its bootstrap AUROCs (paired across runs on the same held-out set), kept in
    bootstrap.npz, not in results.json."""

    evaluation: str  # linear_probe | zero_shot | finetune
    dataset: str
    task: str
    comparison: str
    auroc: float
    auroc_ci95: list[float] | None = None
    auroc_point: float | None = None
    auprc: float | None = None
    n_test: int | None = None
    draws: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        """(dataset, task, comparison): what ``greenlab.compare`` pairs runs on; a task scored by another
        evaluation than the linear probe (the kNN probe beside it) is named with it, "grade [knn_probe]"."""
        task = self.task if self.evaluation == "linear_probe" else f"{self.task} [{self.evaluation}]"
        return self.dataset, task, self.comparison


@dataclass
class HeldOut:
    """A held-out set in the order it was scored: item ids (N,) and labels (N, tasks), -1 = no label."""

    ids: np.ndarray
    labels: np.ndarray


@dataclass
class Predictions:
    """One scored task's cases: ``ids`` (N,), ``labels`` (N,) as greenlab codes them (class index; a finding
    1 / 0, -2 uncertain, -1 missing), ``scores`` (N, K) the class probabilities in ``classes`` order, ``folds``
    (N,) the fold that scored each case (k-fold fine-tuning) or None. predictions.csv holds one row per case."""

    evaluation: str
    dataset: str
    task: str
    classes: list[str]
    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    folds: np.ndarray | None = None

    def rows(self) -> list[dict]:
        """predictions.csv's rows of this task (``PREDICTION_KEYS``, then ``score_<class>``)."""
        folds = self.folds if self.folds is not None else [""] * len(self.ids)
        return [{"evaluation": self.evaluation, "dataset": self.dataset, "task": self.task, "fold": fold,
                 "id": str(case), "label": int(label),
                 **{f"score_{c}": float(v) for c, v in zip(self.classes, scores)}}
                for case, label, scores, fold in zip(self.ids, self.labels, self.scores, folds)]  # fmt: skip


def write_predictions(predictions: list[Predictions], path: Path) -> None:
    """predictions.csv: one row per scored case of every task; a score column per class any task has (blank
    where a task has no such class)."""
    rows = [row for p in predictions for row in p.rows()]
    scores = list(dict.fromkeys(f"score_{c}" for p in predictions for c in p.classes))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, [*PREDICTION_KEYS, *scores], restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_predictions(path: Path) -> list[Predictions]:
    """predictions.csv back as one ``Predictions`` per (evaluation, dataset, task); errors name the file."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [k for k in PREDICTION_KEYS if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a greenlab predictions file (no column {missing[0]!r})")
        groups: dict[tuple, list[dict]] = {}
        for row in reader:
            groups.setdefault((row["evaluation"], row["dataset"], row["task"]), []).append(row)
    found = []
    for (evaluation, dataset, task), rows in groups.items():
        columns = [k for k in rows[0] if k.startswith("score_") and rows[0][k] != ""]
        folds = [r["fold"] for r in rows]
        found.append(Predictions(
            evaluation, dataset, task, [c.removeprefix("score_") for c in columns],
            np.array([r["id"] for r in rows], dtype=str), np.array([int(r["label"]) for r in rows]),
            np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64).reshape(len(rows), len(columns)),
            np.array([int(f) for f in folds]) if all(folds) else None,
        ))  # fmt: skip
    return found


@dataclass
class Embedding:
    """The frozen embedding an evaluation used: ``dim`` floats of ``dtype`` per image; throughput in img/s."""

    dim: int
    dtype: str
    bytes_per_image: int
    pooling: str
    throughput_img_s: float
    throughput_method: str


@dataclass
class Evaluated:
    """What an evaluation returns: its metrics (headline numbers and its own detail), the comparisons it
    scored, the held-out sets they were scored on, and the embedding (None: none computed)."""

    metrics: dict
    comparisons: list[Comparison] = field(default_factory=list)
    held_out: dict[str, HeldOut] = field(default_factory=dict)
    embedding: Embedding | None = None
    predictions: list[Predictions] = field(default_factory=list)


@dataclass
class Deviation:
    """One way a run differs from its experiment's paper recipe (greenlab/results/recipe.py)."""

    key: str
    paper: object
    used: object
    why: str


@dataclass
class Recipe:
    """The run against its paper recipe: ``faithful`` None when there is none to compare (``note`` says why)."""

    experiment: str | None
    faithful: bool | None
    deviations: list[Deviation] = field(default_factory=list)
    note: str | None = None

    @classmethod
    def from_json(cls, content: dict) -> Recipe:
        """From results.json's ``recipe`` (or ``recipe.deviations``' dict with ``experiment``)."""
        return cls(content.get("experiment"), content.get("faithful"),
                   [Deviation(**d) for d in content.get("deviations", [])], content.get("note"))  # fmt: skip


@dataclass
class Phase:
    """What one phase of a run (``pretrain``, ``evaluate``) cost: wall seconds, kWh, kg CO2e, how measured."""

    seconds: float
    kwh: float
    co2e_kg: float
    energy_method: str


@dataclass
class Results:
    """One run's results (results.json + bootstrap.npz). ``compute`` / ``energy``: the whole run's totals
    (``phases``: the same by phase); ``pretraining``: None for a trained run, else why nothing was trained."""

    experiment: str
    scale: str
    created: str
    greenlab_version: str
    run_dir: str
    recipe: Recipe
    init: dict
    data: dict
    optimized_metric: str
    metrics: dict
    comparisons: list[Comparison]
    embedding: Embedding | None
    compute: dict
    energy: dict
    phases: dict[str, Phase]
    objective: dict | None
    artifacts: dict
    config: dict
    held_out: dict[str, HeldOut] = field(
        default_factory=dict, repr=False, compare=False
    )  # arrays: see to_json
    pretraining: str | None = None
    preprocessing: dict | None = None
    schema_version: int = SCHEMA_VERSION
    predictions: list[Predictions] = field(default_factory=list, repr=False, compare=False)  # predictions.csv

    def headline(self) -> dict[str, float]:
        """The metrics that are single numbers (what loggers and sweepers take)."""
        return {
            k: v for k, v in self.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }

    def to_json(self) -> dict:
        """results.json's content (no arrays: those are bootstrap.npz's; NaN / inf as null)."""
        content = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("held_out", "predictions")
        }
        content["comparisons"] = [
            {k: v for k, v in dataclasses.asdict(c).items() if k != "draws"} for c in self.comparisons
        ]
        content["held_out_sets"] = list(self.held_out)  # their arrays: bootstrap.npz, by position
        return _finite(_plain(content))

    def arrays(self) -> dict[str, np.ndarray]:
        """bootstrap.npz's content: each comparison's draws and each held-out set, by position."""
        arrays = {NpzKeys.draws(i): c.draws for i, c in enumerate(self.comparisons) if c.draws is not None}
        for j, held_out in enumerate(self.held_out.values()):
            arrays[NpzKeys.ids(j)], arrays[NpzKeys.labels(j)] = held_out.ids, held_out.labels
        return arrays

    def write(self, folder: Path) -> tuple[Path, Path | None]:
        """results.json (and bootstrap.npz when there are arrays, predictions.csv when there are per-case
        scores) in ``folder``; never replaces any of them."""
        json_path, npz_path = folder / RESULTS_FILE, folder / BOOTSTRAP_FILE
        for path in (json_path, npz_path, folder / PREDICTIONS_FILE):
            if path.exists():
                raise FileExistsError(
                    f"{path} already exists: greenlab never overwrites an earlier run's results"
                )
        arrays = self.arrays()
        if arrays:
            np.savez_compressed(npz_path, **arrays)
        if self.predictions:
            write_predictions(self.predictions, folder / PREDICTIONS_FILE)
        json_path.write_text(json.dumps(self.to_json(), indent=2, default=str))
        return json_path, npz_path if arrays else None

    @classmethod
    def from_json(cls, content: dict, arrays: dict | None = None) -> Results:
        """A Results from results.json's ``content`` (any schema version) and bootstrap.npz's ``arrays``."""
        arrays = arrays or {}
        if content.get("schema_version", 1) == 1:
            return _from_version_1(content, arrays)
        names = set(f.name for f in dataclasses.fields(cls))
        values = {k: v for k, v in content.items() if k in names}
        values["recipe"] = Recipe.from_json(content["recipe"])
        values["embedding"] = _embedding(content.get("embedding"))
        values["phases"] = {name: Phase(**phase) for name, phase in (content.get("phases") or {}).items()}
        values["comparisons"] = [
            Comparison(**row, draws=arrays.get(NpzKeys.draws(i)))
            for i, row in enumerate(content["comparisons"])
        ]
        values["held_out"] = {
            name: HeldOut(arrays[NpzKeys.ids(j)], arrays[NpzKeys.labels(j)])
            for j, name in enumerate(content.get("held_out_sets", []))
            if NpzKeys.ids(j) in arrays
        }
        return cls(**values)

    @classmethod
    def from_folder(cls, folder: Path) -> Results:
        """Read a run folder's results.json and bootstrap.npz (when there is one); errors name the file."""
        json_path, npz_path = Path(folder) / RESULTS_FILE, Path(folder) / BOOTSTRAP_FILE
        if not json_path.is_file():
            raise FileNotFoundError(f"{json_path} not found: not a finished greenlab run")
        try:
            content = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path} is not valid JSON: {err}") from err
        arrays = {}
        if npz_path.is_file():
            with np.load(npz_path) as npz:
                arrays = {key: npz[key] for key in npz.files}
        try:
            results = cls.from_json(content, arrays)
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"{json_path} is not a greenlab results file: {type(err).__name__}: {err}"
            ) from err
        predictions_path = Path(folder) / PREDICTIONS_FILE
        if predictions_path.is_file():
            results.predictions = read_predictions(predictions_path)
        return results


class NpzKeys:
    """The names of bootstrap.npz's arrays, built here only: positions in results.json's lists (names with
    any character are safe), and version 1's ``auroc/<dataset>/<task>/<class>`` for earlier runs."""

    @staticmethod
    def draws(index: int) -> str:
        return f"draws/{index}"

    @staticmethod
    def ids(index: int) -> str:
        return f"held_out/{index}/ids"

    @staticmethod
    def labels(index: int) -> str:
        return f"held_out/{index}/labels"

    @staticmethod
    def version_1_draws(dataset: str, task: str, comparison: str) -> str:
        return f"auroc/{dataset}/{task}/{comparison}"


def probe_comparisons(record: dict) -> list[tuple[str, dict]]:
    """A scored linear-probe task record's comparisons: (MACRO, the record), then (class, its scores) for
    each class of a multi-class task."""
    return [(MACRO, record), *record["per_class"].items()]


def _from_version_1(content: dict, arrays: dict) -> Results:
    """A results.json written before schema_version: comparisons from ``metrics.probe_tasks``, draws from
    ``auroc/<dataset>/<task>/<class>`` (looked up by the names results.json gives, never split)."""
    comparisons, data = [], (content.get("data") or {}).get("name")
    for name, record in content["metrics"].get("probe_tasks", {}).items():
        if "auroc" not in record:  # skipped
            continue
        dataset, task = record.get("dataset", data), record.get("task", name)
        for comparison, row in probe_comparisons({"per_class": {}, **record}):
            key = NpzKeys.version_1_draws(dataset, task, comparison)
            comparisons.append(Comparison("linear_probe", dataset, task, comparison, row["auroc"], row.get("auroc_ci95"),
                                          row.get("auroc_point"), row.get("auprc"), record.get("n_test"),
                                          arrays.get(key)))  # fmt: skip
    held_out = {
        key.split("/", 1)[1]: HeldOut(value, arrays[f"labels/{key.split('/', 1)[1]}"])
        for key, value in arrays.items()
        if key.startswith("ids/")
    }
    energy = content.get("energy") or {}
    return Results(
        experiment=content.get("experiment"), scale=content.get("scale"), created=content.get("created"),
        greenlab_version=content.get("greenlab_version"), run_dir=content.get("run_dir"),
        recipe=Recipe.from_json(content.get("recipe") or {}),
        init=content.get("init") or {}, data=content.get("data") or {},
        optimized_metric=content.get("optimized_metric"), metrics=content["metrics"], comparisons=comparisons,
        embedding=_embedding(content.get("embedding")),
        compute=content.get("compute") or {}, energy=energy, phases={}, objective=content.get("objective"),
        artifacts=content.get("artifacts") or {}, config=content.get("config") or {}, held_out=held_out,
        pretraining=content.get("pretraining"), preprocessing=content.get("preprocessing"), schema_version=1,
    )  # fmt: skip


def _embedding(content: dict | None) -> Embedding | None:
    """results.json's embedding (version 1 files may lack fields: None)."""
    if not content:
        return None
    return Embedding(**{f.name: content.get(f.name) for f in dataclasses.fields(Embedding)})


def _plain(value):
    """Dataclasses, numpy scalars and tuples as JSON's dicts, numbers and lists."""
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _finite(value):
    """JSON has no NaN / inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
