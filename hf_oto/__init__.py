"""hf_oto: Only Train Once (OTO) for Hugging Face models.

Partition a model into zero-invariant groups, train it once with the HSPG optimizer, and slice the zero groups away
into a slim model that gives the same outputs.
"""

__version__ = "0.1.0.dev0"

from .callbacks import OTOSparsityCallback
from .flops import count_flops, count_parameters
from .group_kinds import GroupKind, register_group_kind
from .image_processing import OTOImageProcessor
from .layout import OTOLayout
from .modeling import load_pruned_model, save_pruned_model
from .models import CifarConvNetConfig, CifarConvNetForImageClassification
from .optim import HSPG, PruningTarget
from .pruned_attention import PrunedAttention
from .pruning import apply_layout, prune_zero_groups
from .report import PruningReport, measure_model, prune_and_measure
from .trainer import OTOTrainer
from .training_args import OTOTrainingArguments
from .zig import (
    TRANSFORMER_LAYOUTS,
    ChannelAdapter,
    TransformerLayout,
    ZIGFamily,
    ZIGMember,
    ZIGSet,
    build_zigs,
    register_channel_adapter,
)


def __getattr__(name: str):
    # The ONNX tools need optimum[onnxruntime] (the `onnx` extra): import them only when asked for.
    if name == "export_onnx":
        from . import onnx

        return onnx.export_onnx
    if name == "benchmark_speedup":
        from . import speedup

        return speedup.benchmark_speedup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HSPG",
    "ChannelAdapter",
    "GroupKind",
    "CifarConvNetConfig",
    "CifarConvNetForImageClassification",
    "OTOImageProcessor",
    "OTOLayout",
    "OTOSparsityCallback",
    "OTOTrainer",
    "OTOTrainingArguments",
    "PrunedAttention",
    "PruningTarget",
    "PruningReport",
    "TRANSFORMER_LAYOUTS",
    "TransformerLayout",
    "ZIGFamily",
    "ZIGMember",
    "ZIGSet",
    "apply_layout",
    "benchmark_speedup",
    "build_zigs",
    "count_flops",
    "count_parameters",
    "export_onnx",
    "load_pruned_model",
    "measure_model",
    "prune_and_measure",
    "prune_zero_groups",
    "register_channel_adapter",
    "register_group_kind",
    "save_pruned_model",
]
