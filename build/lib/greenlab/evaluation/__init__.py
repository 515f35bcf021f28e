"""Evaluation of trained backbones: frozen embeddings + linear probes."""
