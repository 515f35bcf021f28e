"""A run's results: the typed model (results.json, bootstrap.npz), results.md, the paper-recipe check, W&B."""
