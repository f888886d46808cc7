"""Optimizers over zero-invariant groups."""

from .hspg import HSPG
from .target import PruningTarget


__all__ = ["HSPG", "PruningTarget"]
