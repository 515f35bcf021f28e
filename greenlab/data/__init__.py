"""LightningDataModules: fundus photograph folders, MedMNIST files, CT / MRI manifests, and the embedded defaults.

``VALUE_RULES``: what the ``data.*`` values of every data option may be (in the words of ``greenlab.config.RULE``),
checked at start-up on the composed config (``greenlab.config.check_values``).
"""

VALUE_RULES = {
    "batch_size": "an integer >= 1",
    "eval_batch_size": "an integer >= 1",
    "num_workers": "an integer >= 0",
    "held_out_fraction": "a number in [0, 1)",
    "split_seed": "an integer",
}
