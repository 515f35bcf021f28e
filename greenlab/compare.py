"""``python -m greenlab.compare``: compare runs' linear probes (bootstrap medians, Wilcoxon wins) (the code: ``greenlab/analysis/compare.py``)."""

from greenlab.analysis.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
