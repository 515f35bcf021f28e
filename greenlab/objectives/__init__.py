"""Pre-training objectives, one LightningModule per file; ``VALUE_RULES``: the ``objective.*`` values' rules."""

VALUE_RULES = {
    "lr": "a number > 0",
    "base_lr": "a number > 0",
    "min_lr": "a number >= 0",
    "start_lr": "a number >= 0",
    "weight_decay": "a number >= 0",
    "mask_ratio": "a number in (0, 1)",
    "warmup_epochs": "an integer >= 0",
    "cosine_epochs": "an integer >= 0",
}
