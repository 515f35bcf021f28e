"""Backbones: timm / MONAI models with the initialisation actually used recorded on ``model.init_record``, how to rebuild it on ``model.recipe`` (backbones/weights.py)."""
