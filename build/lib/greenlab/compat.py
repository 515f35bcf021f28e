"""Imports that need a shim on current Python / numpy."""

import collections
import collections.abc


def import_minkowski():
    """Import MinkowskiEngine 0.5.4, which still uses ``collections.Sequence`` (gone since Python 3.10)."""
    if not hasattr(collections, "Sequence"):
        collections.Sequence = collections.abc.Sequence
    import MinkowskiEngine

    return MinkowskiEngine
