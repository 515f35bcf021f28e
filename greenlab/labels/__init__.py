"""Report -> label distillation: radiology reports become present (1) / absent (0) / uncertain (-1) /
not mentioned (blank) labels per finding, by rules (CheXpert-labeller style) or an LLM.

A labeller (``greenlab/conf/data/labeller/``: rules | llm) has ``vocabulary`` and ``label_many(texts, ids)``.
Labels users give in CSV tables (labels CSVs, manifests) are read and coded by ``tables``, which the data
modules use too.
"""

from __future__ import annotations

import pandas as pd


def label_reports(ids: list[str], texts: list[str], labeller) -> pd.DataFrame:
    """One row per report: ``id``, then one nullable-int column per finding of ``labeller.vocabulary``."""
    rows = labeller.label_many(texts, ids)
    frame = pd.DataFrame(rows, columns=labeller.vocabulary.names).astype("Int64")
    frame.insert(0, "id", ids)
    return frame
