"""Backbones: timm / MONAI models with the initialisation actually used recorded on ``model.greenlab_init``."""
