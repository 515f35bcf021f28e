"""Which images are held out for evaluation: by image id, by group (patient / subject), or the dataset's own split.

Each function returns one flag per image (True = held out) and a record for results.json (``data.split``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

GROUP_COLUMNS = ("patient_id", "patient", "subject_id", "subject")  # a labels CSV column found by these names
OFFICIAL_SIDES = {  # split-column value -> side
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


def group_column(explicit: str | None, columns) -> str | None:
    """The patient / subject column: ``explicit`` when given, else the first of ``GROUP_COLUMNS`` among
    ``columns``, else None (the split is by item id)."""
    return explicit or next((c for c in GROUP_COLUMNS if c in columns), None)


def held_out(item_id: str, fraction: float, seed: int) -> bool:
    """Deterministic split: the same id always lands on the same side, whatever the other files are."""
    digest = hashlib.sha1(f"{seed}:{item_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def by_id(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[bool], dict]:
    """Each image on its own (hash of its id): two images of one patient can land on both sides."""
    flags = [held_out(i, fraction, seed) for i in ids]
    return flags, {"method": "by image id (hash)", "held_out_fraction": fraction, **_counts(flags)}


def by_group(
    groups: Sequence[str], strata: Sequence[int] | None, fraction: float, seed: int, column: str
) -> tuple[list[bool], dict]:
    """All images of a group on one side. With ``strata`` (one label per image, -1 = none), scikit-learn's
    ``StratifiedGroupKFold(round(1 / fraction), shuffle=True, random_state=seed)`` and its first fold held
    out: the classes' shares kept on both sides as far as whole groups allow. Without, the
    ``max(1, round(fraction x groups))`` groups first in the order of their names' hashes (a group keeps
    its side when others are added, unless it sits at the boundary)."""
    groups = [str(g) for g in groups]
    distinct = sorted(set(groups))
    folds = max(2, round(1 / fraction))
    if len(distinct) < folds:
        raise ValueError(
            f"group column {column!r}: {len(distinct)} group(s), fewer than the {folds} a held-out share "
            f"of {fraction} needs"
        )
    if strata is None:
        by_hash = sorted(distinct, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
        chosen = set(by_hash[: max(1, round(fraction * len(distinct)))])
        flags = [g in chosen for g in groups]
        method = f"grouped by {column!r} (groups in hash order)"
    else:
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # a class with fewer groups than folds: stratified as far as it goes
            warnings.simplefilter("ignore", UserWarning)
            _, test = next(splitter.split(np.zeros(len(groups)), np.asarray(strata), groups))
        flags = np.zeros(len(groups), bool)
        flags[test] = True
        flags = flags.tolist()
        method = f"grouped by {column!r}, stratified by the first task (StratifiedGroupKFold, {folds} folds)"
    test_groups = {g for g, f in zip(groups, flags) if f}
    record = {
        "method": method,
        "group_column": column,
        "groups": len(distinct),
        "groups_held_out": len(test_groups),
        **_counts(flags),
    }
    return flags, record


def official(values: Sequence, column: str, source: str) -> tuple[list[str], dict]:
    """The dataset's own split: each value one of train / val / test (case and synonyms as
    ``OFFICIAL_SIDES``). Returns the side of each image; probes fit on train and score on test (val when the
    dataset has no test)."""
    sides = []
    for row, value in enumerate(values):
        side = OFFICIAL_SIDES.get(str(value).strip().lower())
        if side is None:
            raise ValueError(
                f"{source}: split column {column!r}, row {row + 2}: {value!r} is not one of "
                f"{sorted(set(OFFICIAL_SIDES))}"
            )
        sides.append(side)
    counts = {s: sides.count(s) for s in ("train", "val", "test")}
    record = {"method": f"official ({column!r} column)", "split_column": column, **counts}
    return sides, record


def _counts(flags: Sequence[bool]) -> dict:
    held = int(sum(flags))
    return {"images_train": len(flags) - held, "images_held_out": held}
