"""Zero-invariant groups (ZIGs): the data model and the builders."""

from .groups import ZIGFamily, ZIGMember, ZIGSet
from .transformers import SUPPORTED_FAMILIES, TRANSFORMER_LAYOUTS, TransformerLayout, build_zigs, get_layout


__all__ = [
    "SUPPORTED_FAMILIES",
    "TRANSFORMER_LAYOUTS",
    "TransformerLayout",
    "ZIGFamily",
    "ZIGMember",
    "ZIGSet",
    "build_zigs",
    "get_layout",
]
