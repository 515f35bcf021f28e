"""greenlab: medical-imaging foundation models on a small compute budget, with the budget measured."""

from greenlab.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
