"""``python -m greenlab.embed``: a frozen backbone's embeddings of a dataset, to fit your own probe (the code:
``greenlab/pipeline/embed.py``)."""

from greenlab.pipeline.embed import main

if __name__ == "__main__":
    raise SystemExit(main())
