"""hf_oto: Only Train Once (OTO) for Hugging Face models.

Partition a model into zero-invariant groups, train it once with the HSPG optimizer, and slice the zero groups away
into a slim model that gives the same outputs.
"""

__version__ = "0.1.0.dev0"

from .zig import TRANSFORMER_LAYOUTS, TransformerLayout, ZIGFamily, ZIGMember, ZIGSet, build_zigs


__all__ = [
    "TRANSFORMER_LAYOUTS",
    "TransformerLayout",
    "ZIGFamily",
    "ZIGMember",
    "ZIGSet",
    "build_zigs",
]
