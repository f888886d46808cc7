"""Model definitions hf_oto ships for its scripts and benchmarks (registered with the transformers Auto classes)."""

from .cifar_convnets import (
    VGG16_LAYERS,
    CifarConvNetConfig,
    CifarConvNetForImageClassification,
    CifarResNet,
    CifarVGG,
)


__all__ = ["VGG16_LAYERS", "CifarConvNetConfig", "CifarConvNetForImageClassification", "CifarResNet", "CifarVGG"]
