"""Per-finding precision / recall / F1 of extracted labels against manual codes (present vs absent).

    python -m greenlab.labels.evaluate --labels labels.csv --reference reports.csv --id-column uid \
        --codes-column Problems --mapping mapping.yaml --out experiments/report_labels

mapping.yaml: ``finding: [manual code, ...]``; a report's finding is present in the reference when any of
its codes (``;``-separated) is listed. Predicted present = label 1; uncertain (-1) counts as not present,
and how many there were is reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml


def score(
    labels: pd.DataFrame, reference: pd.DataFrame, id_column: str, codes_column: str, mapping: dict
) -> pd.DataFrame:
    merged = labels.merge(reference[[id_column, codes_column]], on=id_column, how="inner")
    codes = (
        merged[codes_column].fillna("").map(lambda v: {c.strip().lower() for c in v.split(";") if c.strip()})
    )
    rows = []
    for finding, manual in mapping.items():
        wanted = {m.lower() for m in manual}
        truth = codes.map(lambda c, wanted=wanted: bool(c & wanted))
        predicted = merged[finding] == 1
        tp, fp = int((truth & predicted).sum()), int((~truth & predicted).sum())
        fn = int((truth & ~predicted).sum())
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else float("nan")
        rows.append({"finding": finding, "reference_positive": int(truth.sum()), "predicted_positive": int(predicted.sum()),
                     "uncertain": int((merged[finding] == -1).sum()), "tp": tp, "fp": fp, "fn": fn,
                     "precision": precision, "recall": recall, "f1": f1})  # fmt: skip
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> str:
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--id-column", required=True)
    parser.add_argument("--codes-column", required=True)
    parser.add_argument("--mapping", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = pd.read_csv(args.labels, dtype={args.id_column: str})
    reference = pd.read_csv(args.reference, dtype={args.id_column: str})
    table = score(
        labels, reference, args.id_column, args.codes_column, yaml.safe_load(args.mapping.read_text())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "label_scores.csv", index=False)
    macro = table[["precision", "recall", "f1"]].mean()
    md = markdown_table(table)
    (args.out / "label_scores.md").write_text(
        md
        + f"\n\nmacro: precision {macro['precision']:.3f}, recall {macro['recall']:.3f}, F1 {macro['f1']:.3f}\n"
    )
    print(md)
    print(f"macro precision {macro['precision']:.3f} recall {macro['recall']:.3f} F1 {macro['f1']:.3f}")


if __name__ == "__main__":
    main()
