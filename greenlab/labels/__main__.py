"""python -m greenlab.labels --input reports.csv --id-column uid --text-columns findings,impression
       --findings chexpert14 --backend rules --output labels.csv

Writes the id column and one column per finding: 1 present, 0 absent, -1 uncertain, blank not mentioned.
An existing output file is never replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from greenlab.config import CONFIG_DIR
from greenlab.labels import label_reports
from greenlab.labels.llm import LLMLabeller
from greenlab.labels.rules import RuleLabeller
from greenlab.labels.tables import read_csv
from greenlab.labels.vocabulary import load_vocabulary


def read_reports(
    path: Path, id_column: str, text_columns: list[str], encoding: str = "utf-8"
) -> tuple[list[str], list[str]]:
    """(ids, texts): the text columns of each row joined; errors name the file and what is wrong."""
    table = read_csv(path, "reports file", encoding)
    if table.empty:
        raise ValueError(f"{path}: a header and no reports")
    missing = [c for c in [id_column, *text_columns] if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} not found (has {list(table.columns)})")
    if table[id_column].duplicated().any():
        raise ValueError(
            f"{path}: duplicate ids in {id_column!r}: {table[id_column][table[id_column].duplicated()].tolist()[:5]}"
        )
    texts = [
        " \n".join(part for part in row if part.strip())
        for row in table[text_columns].itertuples(index=False)
    ]
    return table[id_column].tolist(), texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, required=True, help="CSV of reports")
    parser.add_argument("--id-column", required=True)
    parser.add_argument("--text-columns", required=True, help="comma-separated, e.g. findings,impression")
    parser.add_argument(
        "--findings",
        required=True,
        help="ctrate18 | merlin30 | greenrfm30 | chexpert14 | path to a YAML vocabulary",
    )
    parser.add_argument("--backend", choices=["rules", "llm"], default="rules")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--encoding", default="utf-8", help="of the reports CSV, e.g. latin-1")
    llm = parser.add_argument_group(
        "llm backend (any OpenAI-compatible endpoint; defaults: greenlab/conf/data/labeller/llm.yaml)"
    )
    defaults = OmegaConf.load(CONFIG_DIR / "data" / "labeller" / "llm.yaml")
    llm.add_argument(
        "--llm-base-url",
        default=os.environ.get("GREENLAB_LLM_BASE_URL"),
        help="e.g. http://localhost:8000/v1",
    )
    llm.add_argument("--llm-model", default=os.environ.get("GREENLAB_LLM_MODEL"))
    llm.add_argument("--llm-prompt", choices=["official", "json"], default=defaults.prompt,
                     help="official: GreenRFM's extraction.py prompt, one CSV line; json: greenlab's JSON schema")  # fmt: skip
    llm.add_argument(
        "--llm-api-key-env", default=defaults.api_key_env, help="name of the variable holding the key"
    )
    llm.add_argument("--llm-concurrency", type=int, default=defaults.concurrency)
    llm.add_argument("--llm-retries", type=int, default=defaults.retries)
    llm.add_argument("--llm-max-connection-failures", type=int, default=defaults.max_connection_failures,
                     help="connection failures in a row before giving up on the endpoint")  # fmt: skip
    llm.add_argument("--llm-on-failure", choices=["blank", "error"], default=defaults.on_failure,
                     help="a report still failing after the retries: blank (extraction.py; listed in "
                          "<cache>.failed.csv) or error (stop)")  # fmt: skip
    llm.add_argument("--cache", type=Path, help="persistent answer cache (default: <output>.llm_cache.jsonl)")
    args = parser.parse_args(argv)
    if args.output.exists():
        print(
            f"error: {args.output} exists; greenlab never replaces a labels file (choose another --output)",
            file=sys.stderr,
        )
        return 2
    try:
        return label_file(args, parser, defaults)
    except (OSError, ValueError, RuntimeError) as err:  # bad input or an unusable endpoint: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 2


def label_file(args, parser, defaults) -> int:
    vocabulary = load_vocabulary(args.findings)
    columns = [c.strip() for c in args.text_columns.split(",")]
    ids, texts = read_reports(args.input, args.id_column, columns, args.encoding)
    if args.backend == "rules":
        labeller = RuleLabeller(vocabulary)
    else:
        if not args.llm_base_url or not args.llm_model:
            parser.error(
                "--backend llm needs --llm-base-url and --llm-model (or GREENLAB_LLM_BASE_URL / GREENLAB_LLM_MODEL)"
            )
        labeller = LLMLabeller(
            vocabulary, args.llm_base_url, args.llm_model, prompt=args.llm_prompt, temperature=defaults.temperature,
            cache_path=args.cache or args.output.with_name(args.output.name + ".llm_cache.jsonl"),
            api_key_env=args.llm_api_key_env, concurrency=args.llm_concurrency, retries=args.llm_retries,
            timeout_s=defaults.timeout_s, backoff_s=defaults.backoff_s,
            max_connection_failures=args.llm_max_connection_failures, on_failure=args.llm_on_failure,
        )  # fmt: skip
    frame = label_reports(ids, texts, labeller)
    frame = frame.rename(columns={"id": args.id_column})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.output, index=False)
    counts = {name: int((frame[name] == 1).sum()) for name in vocabulary.names}
    print(
        f"{len(frame)} reports labelled with {vocabulary.name} ({args.backend}) -> {args.output}; present: {counts}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
