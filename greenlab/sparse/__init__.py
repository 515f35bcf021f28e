"""Sparse convolution for masked image modelling of CNNs (SparK): a dense CNN, unchanged in its weights
and parameter names, computed on the visible positions only. Two backends with one semantics:
``masked_dense`` (dense ops re-masked) and ``minkowski`` (MinkowskiEngine sparse tensors)."""
