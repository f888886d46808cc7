"""Optimizers over zero-invariant groups."""

from .hspg import HSPG


__all__ = ["HSPG"]
