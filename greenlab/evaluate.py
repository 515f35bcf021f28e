"""``python -m greenlab.evaluate``: evaluate a backbone without training it (the code: ``greenlab/pipeline/evaluate.py``)."""

from greenlab.pipeline.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
