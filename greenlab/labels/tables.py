"""The CSV tables users give (labels CSVs, manifests, reports), read as text and checked, and their label
columns coded by a schema: nothing is silently recoded, dropped or reordered.

Class labels (``class_labels``, one task per column): by default every non-blank cell is a non-negative
integer (``3``, or ``3.0`` as spreadsheets write it); anything else is an error naming the file, column, row
and value. Text classes only when the user says so: ``label_types: {column: [class0, class1, ...]}`` (that
order, the class index is the position) or ``{column: text}`` (natural order: "2" before "10"). Blank = no
label. The schema (type, classes, counts, missing) is logged once and returned for results.json.

Finding labels (``finding_labels``, CT / MRI manifests and report labels): 1 present, 0 absent, -1
uncertain, blank not stated; anything else is an error naming the cell.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

INTEGER = re.compile(r"^\s*\+?(\d+)(?:\.0*)?\s*$")
FINDING = {"1": 1, "0": 0, "-1": -1}


def read_csv(path: Path, what: str, encoding: str = "utf-8") -> pd.DataFrame:
    """Every cell as text ("" when blank); a missing, empty, undecodable or malformed file is an error naming
    it. ``what`` says which file it is (e.g. "labels CSV")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file (no header, no rows)") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not {encoding} text ({err.reason}); re-save it as UTF-8, or give its encoding "
                         "where the reader takes one (python -m greenlab.labels --encoding latin-1)") from None  # fmt: skip
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: not a readable CSV ({str(err).strip()})") from None


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def class_labels(
    table: pd.DataFrame, columns: list[str], source: Path, label_types: dict | None = None
) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """({column: class index per row, -1 = blank}, {column: schema}) for text ``table`` (``read_csv``)."""
    label_types = dict(label_types or {})
    unknown = sorted(set(label_types) - set(columns))
    if unknown:
        raise ValueError(f"label_types names {unknown}, not label columns of {source} ({columns})")
    if table.empty:
        raise ValueError(f"{source}: a header and no rows")
    coded, schema = {}, {}
    for column in columns:
        cells = table[column].str.strip()
        declared = label_types.get(column)
        if declared is None:
            kind, numbers = "integer", [_integer(c, column, row, source) for row, c in enumerate(cells)]
            present = [n for n in numbers if n >= 0]
            classes = list(range(max(2, max(present) + 1))) if present else []
        else:
            if declared == "text":
                classes = sorted({c for c in cells if c}, key=_natural_key)
            elif isinstance(declared, list | tuple) and len(declared) >= 2:
                classes = [str(c) for c in declared]
            else:
                raise ValueError(
                    f"label_types.{column} must be 'text' or a list of >= 2 classes, got {declared!r}"
                )
            index = {c: i for i, c in enumerate(classes)}
            kind, numbers = "text", []
            for row, cell in enumerate(cells):
                if cell and cell not in index:
                    raise ValueError(f"{source}: column {column!r}, row {row + 2}: {cell!r} is not one of the "
                                     f"classes {classes} (label_types.{column})")  # fmt: skip
                numbers.append(index[cell] if cell else -1)
        if not classes or all(n < 0 for n in numbers):
            raise ValueError(f"{source}: column {column!r} has no labels (every cell blank)")
        counts = np.bincount([n for n in numbers if n >= 0], minlength=len(classes)).tolist()
        schema[column] = {"type": kind, "classes": [str(c) for c in classes], "counts": counts,
                          "missing": sum(n < 0 for n in numbers)}  # fmt: skip
        log.info("%s: task %r, %s", source.name, column, schema[column])
        coded[column] = numbers
    return coded, schema


def _integer(cell: str, column: str, row: int, source: Path) -> int:
    if not cell:
        return -1
    match = INTEGER.match(cell)
    if match is None:
        hint = (
            "labels are non-negative integers, blank for none"
            if re.match(r"^\s*[-+]?[\d.]+\s*$", cell)
            else f"text classes need data.label_types.{column}=[class order] (or text for natural order)"
        )
        raise ValueError(
            f"{source}: column {column!r}, row {row + 2}: {cell!r} is not a class label ({hint})"
        )
    return int(match.group(1))


def finding_labels(frame: pd.DataFrame, source: Path) -> np.ndarray:
    """(N, C) float: 1, 0, -1 or NaN (blank) from text cells; any other value is an error naming it."""
    out = np.full(frame.shape, np.nan)
    for j, column in enumerate(frame.columns):
        for row, value in enumerate(frame[column].tolist()):
            cell = (
                "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value).strip()
            )
            if not cell:
                continue
            value = FINDING.get(cell[:-2] if cell.endswith(".0") else cell)
            if value is None:
                raise ValueError(f"{source}: column {column!r}, row {row + 2}: {cell!r} is not a finding label "
                                 "(1 present, 0 absent, -1 uncertain, blank not stated)")  # fmt: skip
            out[row, j] = value
    return out
