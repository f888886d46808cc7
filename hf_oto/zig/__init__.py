"""Zero-invariant groups (ZIGs): the data model and the builders."""

from .build import SUPPORTED_FAMILIES, build_zigs, default_families, has_transformer_layout
from .conv import ChannelAdapter, channel_families, register_channel_adapter
from .groups import ZIGFamily, ZIGMember, ZIGSet
from .transformers import TRANSFORMER_FAMILIES, TRANSFORMER_LAYOUTS, TransformerLayout, get_layout


__all__ = [
    "SUPPORTED_FAMILIES",
    "TRANSFORMER_FAMILIES",
    "TRANSFORMER_LAYOUTS",
    "ChannelAdapter",
    "TransformerLayout",
    "ZIGFamily",
    "ZIGMember",
    "ZIGSet",
    "build_zigs",
    "channel_families",
    "default_families",
    "get_layout",
    "has_transformer_layout",
    "register_channel_adapter",
]
