"""``python -m greenlab.study``: a sweep's results as one table and plots (the code: ``greenlab/analysis/study.py``)."""

from greenlab.analysis.study import main

if __name__ == "__main__":
    raise SystemExit(main())
