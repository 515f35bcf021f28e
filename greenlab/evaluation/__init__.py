"""Evaluation of trained backbones: frozen embeddings + linear probes.

``VALUE_RULES``: what the ``evaluation.*`` values of every evaluation option may be (in the words of
``greenlab.config.RULE``), checked at start-up on the composed config (``greenlab.config.check_values``).
"""

VALUE_RULES = {
    "bootstrap_resamples": "an integer >= 1",
    "ci_resamples": "an integer >= 1",
    "folds": "an integer >= 2",
    "epochs": "an integer >= 1",
}
