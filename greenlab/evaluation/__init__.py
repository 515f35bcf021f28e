"""Evaluations of a backbone: linear probes on frozen embeddings, k-fold fine-tuning, zero-shot diagnosis.
Each returns ``greenlab.results.model.Evaluated``. ``VALUE_RULES``: the ``evaluation.*`` values' rules (the
words of ``greenlab.config.RULE``, checked at start-up by ``greenlab.config.check_values``)."""

VALUE_RULES = {
    "bootstrap_resamples": "an integer >= 1",
    "ci_resamples": "an integer >= 1",
    "folds": "an integer >= 2",
    "epochs": "an integer >= 1",
}
