"""Reading many runs: model comparisons (``compare``) and sweep tables (``study``)."""
