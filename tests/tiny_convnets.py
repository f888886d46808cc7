"""Small convolutional networks for the channel-ZIG tests, each exercising one graph pattern (no hub)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    EfficientNetConfig,
    EfficientNetForImageClassification,
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    RegNetConfig,
    RegNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification, CifarResNet, CifarVGG


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, read by a conv; then pooled into a linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(3, 1, 1))
        self.merge = nn.Sequential(nn.Conv2d(6 + 5 + 8, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU())
        self.head = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        merged = self.merge(torch.cat([self.left(stem), self.right(stem), stem], dim=1))
        return self.head(merged.mean(dim=(2, 3)))


class InvertedResidualNet(nn.Module):
    """MobileNetV2-style blocks: 1x1 expand, 3x3 depthwise, 1x1 project, residual add; a flatten to a linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.ModuleList([self._block(8, 16), self._block(8, 12)])
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(8 * 4, 5)

    @staticmethod
    def _block(channels: int, hidden: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=True),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(x)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(self.pool(hidden).flatten(1))


class SqueezeExciteNet(nn.Module):
    """A squeeze-and-excitation gate (sigmoid) on a conv, a grouped conv and a BN without affine parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.grouped = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12), nn.ReLU())
        self.plain = nn.Sequential(nn.Conv2d(12, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(6, 10, 1), nn.BatchNorm2d(10), nn.ReLU())
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(x)
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(hidden.mean((2, 3), keepdim=True)))))
        hidden = self.last(self.plain(self.grouped(hidden * gate)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(hidden, 1), 1))


class FusedBatchNormReLU(nn.BatchNorm2d):
    """A fused norm + activation with Python control flow on a tensor value: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if out.numel() > 0 and bool(out.isnan().any()):
            raise RuntimeError("NaN")
        return torch.relu(out)


class FusedNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = FusedBatchNormReLU(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.norm2 = FusedBatchNormReLU(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return self.head(hidden.mean((2, 3)))


class FeatureExtractor(nn.Module):
    """Returns its last feature map: those channels are a model output and must stay."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_vgg() -> CifarConvNetForImageClassification:
    """Two conv stages, a flatten of 2 x 2 maps into a hidden linear layer (each channel owns 4 columns)."""
    config = CifarConvNetConfig(
        architecture="vgg", vgg_layers=[8, "M", 12, 12, "M"], image_size=8, classifier_hidden=10, num_labels=3
    )
    return CifarConvNetForImageClassification(config)


def tiny_cifar_resnet(block: str = "bottleneck") -> CifarConvNetForImageClassification:
    config = CifarConvNetConfig(
        architecture="resnet", block=block, depths=[2, 1, 2], widths=[4, 6, 8], stem_width=8, num_labels=3,
        image_size=16,
    )  # fmt: skip
    return CifarConvNetForImageClassification(config)


def tiny_hf_resnet(layer_type: str = "bottleneck") -> ResNetForImageClassification:
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 24], depths=[2, 1, 2], layer_type=layer_type,
        num_labels=3, image_size=32,
    )  # fmt: skip
    return ResNetForImageClassification(config)


def tiny_hf_regnet() -> RegNetForImageClassification:
    """RegNet-Y: grouped 3 x 3 convolutions (kept dense) and squeeze-excite gates."""
    config = RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], groups_width=4, layer_type="y", num_labels=3
    )
    return RegNetForImageClassification(config)


def tiny_hf_efficientnet() -> EfficientNetForImageClassification:
    """EfficientNet-B0 layout at a tenth of the width: expand, depthwise, squeeze-excite, project, residual adds."""
    config = EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.25, hidden_dim=128, num_labels=3
    )
    return EfficientNetForImageClassification(config)


def tiny_hf_convnext(version: int = 1) -> nn.Module:
    """ConvNeXt: LayerNorms over channels (kept dense) and prunable channels-last MLPs (with a global response norm
    in V2). Layer scales start at 1 (not 1e-6) and GRN weights and biases are random (not 0), so they matter."""
    kwargs = {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 2], "image_size": 32, "num_labels": 3}
    if version == 1:
        return ConvNextForImageClassification(ConvNextConfig(layer_scale_init_value=1.0, **kwargs))
    model = ConvNextV2ForImageClassification(ConvNextV2Config(**kwargs))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if ".grn." in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def tiny_hf_mobilenet(version: int = 1) -> nn.Module:
    """MobileNetV1 (depthwise separable) / MobileNetV2 (inverted residuals), with TensorFlow "SAME" padding."""
    if version == 1:
        return MobileNetV1ForImageClassification(
            MobileNetV1Config(depth_multiplier=0.25, min_depth=4, image_size=32, num_labels=3)
        )
    return MobileNetV2ForImageClassification(
        MobileNetV2Config(depth_multiplier=0.25, min_depth=4, image_size=32, num_labels=3)
    )


TINY_CONVNET_FACTORIES = {
    "cifar-vgg": tiny_vgg,
    "cifar-resnet-bottleneck": tiny_cifar_resnet,
    "cifar-resnet-basic": lambda: tiny_cifar_resnet("basic"),
    "plain-cifar-vgg": lambda: CifarVGG([6, "M", 8, "M"], num_classes=3, image_size=32),
    "plain-cifar-resnet": lambda: CifarResNet("bottleneck", depths=[2, 1], widths=[4, 6], num_classes=3, stem_width=8),
    "hf-resnet-bottleneck": tiny_hf_resnet,
    "hf-resnet-basic": lambda: tiny_hf_resnet("basic"),
    "hf-regnet": tiny_hf_regnet,
    "hf-efficientnet": tiny_hf_efficientnet,
    "hf-convnext": tiny_hf_convnext,
    "hf-convnext-v2": lambda: tiny_hf_convnext(2),
    "hf-mobilenet-v1": tiny_hf_mobilenet,
    "hf-mobilenet-v2": lambda: tiny_hf_mobilenet(2),
    "concat": ConcatNet,
    "inverted-residual": InvertedResidualNet,
    "squeeze-excite": SqueezeExciteNet,
}


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so pruning bugs in BN slicing show in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
            if module.affine:
                module.weight.data.copy_(0.5 + torch.rand(module.num_features, generator=generator))
                module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model


def images(model: nn.Module, batch: int = 3, seed: int = 0) -> torch.Tensor:
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", 32)  # plain modules are traced at 32 x 32 by default
    return torch.randn(
        batch, getattr(config, "num_channels", 3), size, size, generator=torch.Generator().manual_seed(seed)
    )


def logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    output = model(pixels)
    return output if isinstance(output, torch.Tensor) else output.logits
