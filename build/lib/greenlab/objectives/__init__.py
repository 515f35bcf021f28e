"""Pre-training objectives, one LightningModule per file."""
