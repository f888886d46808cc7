"""VGG16-BN and ResNet in the CIFAR layout (the networks of the OTO paper's Tables 1-2), as transformers models.

The networks themselves are plain PyTorch ([`CifarVGG`], [`CifarResNet`]); [`CifarConvNetForImageClassification`]
wraps them as a `PreTrainedModel` so they train with the `Trainer`, save and load in the Hub format, and reload
pruned with [`~hf_oto.load_pruned_model`]. Both classes are registered with `AutoConfig` and
`AutoModelForImageClassification` (model type `"hf-oto-cifar-convnet"`) when `hf_oto` is imported.

CIFAR layout: a 3 x 3 stem without max pooling (the inputs are 32 x 32), so VGG16-BN ends at 1 x 1 after five
pools and the ResNet stages run at 32, 16, 8 and 4 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention


VGG16_LAYERS: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
"""VGG16: thirteen 3 x 3 convolutions (output channels) and five 2 x 2 max pools (`"M"`)."""

ARCHITECTURES = ("vgg", "resnet")
BLOCKS = ("basic", "bottleneck")


class CifarVGG(nn.Module):
    """VGG with batch norm: `conv3x3 - BN - ReLU` blocks and max pools, then flatten and a linear classifier.

    Args:
        layers (`Sequence[int | str]`): Output channels of each convolution, `"M"` for a 2 x 2 max pool.
        num_classes (`int`): Number of classes.
        in_channels (`int`): Channels of the input images.
        image_size (`int`): Input height and width; the flattened features are `last channels x (size / 2^pools)^2`.
        classifier_hidden (`int`, *optional*): Width of a hidden linear layer (with ReLU) before the output layer.
    """

    def __init__(
        self,
        layers: Sequence[int | str] = VGG16_LAYERS,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        classifier_hidden: int | None = None,
    ):
        super().__init__()
        features: list[nn.Module] = []
        channels, size = in_channels, image_size
        for layer in layers:
            if layer == "M":
                features.append(nn.MaxPool2d(2))
                size //= 2
                continue
            features += [nn.Conv2d(channels, int(layer), 3, padding=1), nn.BatchNorm2d(int(layer)), nn.ReLU()]
            channels = int(layer)
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for {list(layers).count('M')} max pools.")
        self.features = nn.Sequential(*features)
        width = channels * size * size
        head: list[nn.Module] = []
        if classifier_hidden:
            head += [nn.Linear(width, classifier_hidden), nn.ReLU()]
            width = classifier_hidden
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(pixel_values), 1))


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(out_channels)]


class BasicBlock(nn.Module):
    """Two 3 x 3 `conv - BN` layers and a residual add (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.residual = nn.Sequential(*_conv_bn(in_channels, width, 3, stride), nn.ReLU(), *_conv_bn(width, width, 3))
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.activation = nn.ReLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(hidden) + self.shortcut(hidden))


class Bottleneck(nn.Module):
    """`1x1 - 3x3 - 1x1` `conv - BN` layers expanding 4x, and a residual add (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, width, 1),
            nn.ReLU(),
            *_conv_bn(width, width, 3, stride),
            nn.ReLU(),
            *_conv_bn(width, out_channels, 1),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.activation = nn.ReLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(hidden) + self.shortcut(hidden))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))


class CifarResNet(nn.Module):
    """ResNet in the CIFAR layout: a 3 x 3 stem, four stages of residual blocks, global average pooling, a linear.

    Args:
        block (`str`): `"bottleneck"` (ResNet-50) or `"basic"` (ResNet-18).
        depths (`Sequence[int]`): Blocks per stage, e.g. `(3, 4, 6, 3)` for ResNet-50.
        widths (`Sequence[int]`): Inner width of each stage, e.g. `(64, 128, 256, 512)`.
        num_classes (`int`): Number of classes.
        in_channels (`int`): Channels of the input images.
        stem_width (`int`): Output channels of the stem convolution.
    """

    def __init__(
        self,
        block: str = "bottleneck",
        depths: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        stem_width: int = 64,
    ):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"Unknown ResNet block {block!r}; choose one of {list(BLOCKS)}.")
        if len(depths) != len(widths) or not depths:
            raise ValueError(f"depths {list(depths)} and widths {list(widths)} must list one entry per stage.")
        block_class = Bottleneck if block == "bottleneck" else BasicBlock
        self.stem = nn.Sequential(*_conv_bn(in_channels, stem_width, 3), nn.ReLU())
        stages, channels = [], stem_width
        for index, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for position in range(depth):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block_class(channels, width, stride))
                channels = width * block_class.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pool(self.stages(self.stem(pixel_values)))
        return self.classifier(torch.flatten(hidden, 1))


class CifarConvNetConfig(PretrainedConfig):
    """Configuration of [`CifarConvNetForImageClassification`]: a VGG or a ResNet in the CIFAR layout.

    Args:
        architecture (`str`, *optional*, defaults to `"vgg"`): `"vgg"` or `"resnet"`.
        num_channels (`int`, *optional*, defaults to 3): Channels of the input images.
        image_size (`int`, *optional*, defaults to 32): Input height and width.
        vgg_layers (`list`, *optional*): VGG convolution widths and `"M"` pools; defaults to VGG16.
        classifier_hidden (`int`, *optional*): VGG only: width of a hidden linear layer before the output layer.
        block (`str`, *optional*, defaults to `"bottleneck"`): ResNet block, `"bottleneck"` or `"basic"`.
        depths (`list[int]`, *optional*, defaults to `[3, 4, 6, 3]`): ResNet blocks per stage.
        widths (`list[int]`, *optional*, defaults to `[64, 128, 256, 512]`): ResNet inner width per stage.
        stem_width (`int`, *optional*, defaults to 64): ResNet stem channels.

    Example:

    ```python
    >>> from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification

    >>> config = CifarConvNetConfig.vgg16_bn(num_labels=10, num_channels=1)
    >>> model = CifarConvNetForImageClassification(config)
    >>> model(torch.zeros(2, 1, 32, 32)).logits.shape
    torch.Size([2, 10])
    ```
    """

    model_type = "hf-oto-cifar-convnet"

    def __init__(
        self,
        architecture: str = "vgg",
        num_channels: int = 3,
        image_size: int = 32,
        vgg_layers: Sequence[int | str] | None = None,
        classifier_hidden: int | None = None,
        block: str = "bottleneck",
        depths: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        **kwargs,
    ):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {architecture!r}; choose one of {list(ARCHITECTURES)}.")
        self.architecture = architecture
        self.num_channels = num_channels
        self.image_size = image_size
        self.vgg_layers = list(vgg_layers) if vgg_layers is not None else list(VGG16_LAYERS)
        self.classifier_hidden = classifier_hidden
        self.block = block
        self.depths = list(depths)
        self.widths = list(widths)
        self.stem_width = stem_width
        super().__init__(**kwargs)

    def scaled(self, width_multiplier: float) -> CifarConvNetConfig:
        """A copy of this configuration with every convolution's width multiplied by `width_multiplier` (rounded,
        at least 1): the uniformly thinner (or wider) network, e.g. the classic baseline for a pruned one, trained from
        scratch at about `width_multiplier ** 2` of the FLOPs.

        Example:

        ```python
        >>> from hf_oto.models import CifarConvNetConfig

        >>> CifarConvNetConfig.resnet18().scaled(0.5).widths
        [32, 64, 128, 256]
        ```
        """
        if (
            isinstance(width_multiplier, bool)
            or not isinstance(width_multiplier, (int, float))
            or width_multiplier <= 0
        ):
            raise ValueError(
                f"width_multiplier must be a positive number (e.g. 0.5 for half); got {width_multiplier!r}."
            )

        def scale(width: int) -> int:
            return max(1, round(width * width_multiplier))

        config = self.__class__.from_dict(self.to_dict())
        config.vgg_layers = [layer if layer == "M" else scale(layer) for layer in self.vgg_layers]
        config.widths = [scale(width) for width in self.widths]
        config.stem_width = scale(self.stem_width)
        if config.classifier_hidden:
            config.classifier_hidden = scale(config.classifier_hidden)
        return config

    @classmethod
    def vgg16_bn(cls, **kwargs) -> CifarConvNetConfig:
        """VGG16 with batch norm (14.7M parameters at 10 classes)."""
        return cls(architecture="vgg", vgg_layers=list(VGG16_LAYERS), **kwargs)

    @classmethod
    def resnet50(cls, **kwargs) -> CifarConvNetConfig:
        """ResNet-50 (bottleneck blocks, 3-4-6-3; 23.5M parameters at 10 classes)."""
        return cls(
            architecture="resnet", block="bottleneck", depths=[3, 4, 6, 3], widths=[64, 128, 256, 512], **kwargs
        )

    @classmethod
    def resnet18(cls, **kwargs) -> CifarConvNetConfig:
        """ResNet-18 (basic blocks, 2-2-2-2; 11.2M parameters at 10 classes)."""
        return cls(architecture="resnet", block="basic", depths=[2, 2, 2, 2], widths=[64, 128, 256, 512], **kwargs)


class CifarConvNetForImageClassification(PreTrainedModel):
    """A [`CifarVGG`] or [`CifarResNet`] as a transformers image classifier (`pixel_values` in, `logits` out).

    Example:

    ```python
    >>> from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification

    >>> model = CifarConvNetForImageClassification(CifarConvNetConfig.resnet18(num_labels=10))
    >>> model(torch.zeros(1, 3, 32, 32), labels=torch.tensor([3])).loss.shape
    torch.Size([])
    ```
    """

    config_class = CifarConvNetConfig
    base_model_prefix = "convnet"
    main_input_name = "pixel_values"

    def __init__(self, config: CifarConvNetConfig):
        super().__init__(config)
        if config.architecture == "vgg":
            self.convnet = CifarVGG(
                config.vgg_layers, config.num_labels, config.num_channels, config.image_size, config.classifier_hidden
            )
        else:
            self.convnet = CifarResNet(
                config.block, config.depths, config.widths, config.num_labels, config.num_channels, config.stem_width
            )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Kaiming *fan_in*: every filter starts with the same norm (sqrt(2)) whatever its layer's width, so the
        # group-lasso penalty, the same for every group, does not favour the layers that widen (with fan_out, a
        # 64 -> 128 conv's filters start at norm 1, a 128 -> 128 conv's at 1.41, and short OTO runs empty the former).
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        logits = self.convnet(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


AutoConfig.register(CifarConvNetConfig.model_type, CifarConvNetConfig, exist_ok=True)
AutoModelForImageClassification.register(CifarConvNetConfig, CifarConvNetForImageClassification, exist_ok=True)
