"""Channel ZIGs of convolutional networks: discovery by torch.fx, exact pruning, adapters, errors, checkpoints."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification, ResNetForImageClassification

from hf_oto import build_zigs, load_pruned_model, save_pruned_model
from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification
from hf_oto.pruning import apply_layout, current_layout, prune_zero_groups
from hf_oto.report import prune_and_measure
from hf_oto.zig import conv
from hf_oto.zig.conv import ChannelAdapter, channel_families, register_channel_adapter

from .tiny_convnets import (
    TINY_CONVNET_FACTORIES,
    FeatureExtractor,
    FusedBatchNormReLU,
    FusedNormNet,
    images,
    logits,
    randomize_batch_norms,
    tiny_cifar_resnet,
    tiny_hf_convnext,
    tiny_hf_efficientnet,
    tiny_hf_mobilenet,
    tiny_hf_regnet,
    tiny_hf_resnet,
    tiny_vgg,
)
from .tiny_models import FROM_PRETRAINED_SIZE_ERROR


TOLERANCE = 1e-5


def _zero_mask(zigs, pattern: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if pattern == "random-half":
        return zigs.random_zero_mask(0.5, generator=generator)
    masks = []
    for index, family in enumerate(zigs.families):
        if pattern == "whole-families":  # every other family loses all its channels (one zero channel stays)
            masks.append(torch.full((family.num_groups,), index % 2 == 0))
        else:  # "all-but-one": every family keeps exactly one channel
            mask = torch.ones(family.num_groups, dtype=torch.bool)
            mask[torch.randint(family.num_groups, (1,), generator=generator)] = False
            masks.append(mask)
    return torch.cat(masks)


def _assert_sizes_match_weights(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels == module.weight.shape[0], name
            assert module.in_channels == module.weight.shape[1] * module.groups, name
        elif isinstance(module, nn.BatchNorm2d):
            assert module.num_features == module.running_mean.numel() == module.running_var.numel(), name
            if module.affine:
                assert module.weight.numel() == module.num_features, name
        elif isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape), name


@pytest.mark.parametrize("channel_penalty", ["conv_and_norm", "norm"])
@pytest.mark.parametrize("pattern", ["random-half", "whole-families", "all-but-one"])
@pytest.mark.parametrize("name", sorted(TINY_CONVNET_FACTORIES))
def test_slim_convnet_equals_group_sparse_model(name, pattern, channel_penalty):
    torch.manual_seed(0)
    model = randomize_batch_norms(TINY_CONVNET_FACTORIES[name]()).eval()
    zigs = build_zigs(model, channel_penalty=channel_penalty)
    zigs.set_zero(_zero_mask(zigs, pattern))
    pixels = images(model)
    with torch.no_grad():
        reference = logits(model, pixels)
    slim, report = prune_and_measure(model, zigs, inplace=False)
    with torch.no_grad():
        pruned = logits(slim, pixels)
    assert pruned.shape == reference.shape
    assert (pruned - reference).abs().max().item() <= TOLERANCE
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    _assert_sizes_match_weights(slim)
    kept = zigs.kept_groups()
    assert report.channels_after == {family: max(count, 1) for family, count in kept.items()}


@pytest.mark.parametrize(
    "config", [CifarConvNetConfig.vgg16_bn, CifarConvNetConfig.resnet50], ids=["vgg16_bn", "resnet50"]
)
def test_full_size_vgg16_bn_and_resnet50_prune_exactly(config):
    torch.manual_seed(0)
    model = randomize_batch_norms(CifarConvNetForImageClassification(config(num_labels=10))).eval()
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.6, generator=torch.Generator().manual_seed(1)))
    pixels = images(model, batch=2)
    with torch.no_grad():
        reference = logits(model, pixels)
        slim, report = prune_and_measure(model, zigs)
        pruned = logits(slim, pixels)
    assert (pruned - reference).abs().max().item() <= TOLERANCE
    assert report.flops_ratio < 0.5


def test_vgg16_bn_has_one_family_per_convolution():
    zigs = build_zigs(CifarConvNetForImageClassification(CifarConvNetConfig.vgg16_bn(num_labels=10)))
    assert [family.num_groups for family in zigs.families] == [c for c in CifarConvNetConfig().vgg_layers if c != "M"]
    first = zigs.families[0]
    assert [m.param_name for m in first.members] == [
        "convnet.features.0.weight",
        "convnet.features.0.bias",
        "convnet.features.1.weight",
        "convnet.features.1.bias",
    ]
    assert first.meta["buffers"] == ["convnet.features.1.running_mean", "convnet.features.1.running_var"]
    # The last conv's channels are read by the classifier after the flatten.
    assert [(d.param_name, d.dim) for d in zigs.families[-1].dependents] == [("convnet.classifier.0.weight", 1)]


def test_resnet50_ties_the_residual_channels_of_a_stage_into_one_family():
    model = CifarConvNetForImageClassification(CifarConvNetConfig.resnet50(num_labels=10))
    zigs = build_zigs(model)
    # stem + 2 inner families per block (16 blocks) + 1 tied family per stage
    assert len(zigs.families) == 1 + 2 * 16 + 4
    stage = zigs.family("convnet.stages.1.0.residual.6.channels")
    producers = stage.meta["producers"]
    assert producers == [
        "convnet.stages.1.0.residual.6",
        "convnet.stages.1.0.shortcut.0",
        "convnet.stages.1.1.residual.6",
        "convnet.stages.1.2.residual.6",
        "convnet.stages.1.3.residual.6",
    ]
    assert stage.num_groups == 512
    # Readers of the tied channels: the first conv of each next block and the next stage's shortcut.
    readers = {d.param_name for d in stage.dependents}
    assert "convnet.stages.1.1.residual.0.weight" in readers and "convnet.stages.2.0.shortcut.0.weight" in readers


def test_flatten_gives_each_channel_its_block_of_linear_columns():
    model = tiny_vgg()  # 12 channels of 2 x 2 maps flattened into 48 columns
    zigs = build_zigs(model)
    last = zigs.families[-2]
    assert last.num_groups == 12
    assert [(d.param_name, d.dim, d.start, d.length) for d in last.dependents] == [
        ("convnet.classifier.0.weight", 1, 0, 48)
    ]
    classifier_rows = zigs.families[-1]
    assert classifier_rows.name == "convnet.classifier.0.channels" and classifier_rows.num_groups == 10


def test_concat_readers_get_one_region_per_branch():
    from .tiny_convnets import ConcatNet

    zigs = build_zigs(ConcatNet())
    regions = {
        family.name: [(d.start, d.length) for d in family.dependents if d.param_name == "merge.0.weight"]
        for family in zigs.families
    }
    assert regions["left.0.channels"] == [(0, 6)]
    assert regions["right.0.channels"] == [(6, 5)]
    assert regions["stem.0.channels"] == [(11, 8)]


def test_depthwise_convolution_joins_the_group_of_its_input_channel():
    from .tiny_convnets import InvertedResidualNet

    zigs = build_zigs(InvertedResidualNet())
    expand = zigs.family("blocks.0.0.channels")
    assert {m.param_name for m in expand.members} >= {"blocks.0.3.weight", "blocks.0.3.bias", "blocks.0.4.weight"}
    assert not any(family.name.startswith("blocks.0.3") for family in zigs.families)


def test_channels_that_could_leak_a_zero_group_are_kept_dense_with_a_reason():
    from .tiny_convnets import SqueezeExciteNet

    families, dense = channel_families(SqueezeExciteNet())
    assert {family.name for family in families} == {"squeeze.channels", "last.0.channels"}
    # The sigmoid gate multiplies conv.0's channels: excite's channels join that family (a zero channel times the
    # gate is zero), which the grouped convolution reading the product keeps dense.
    assert "grouped convolution" in dense["conv.0.channels"]
    assert "excite.channels" not in dense
    assert "no affine weight" in dense["plain.0.channels"]
    assert any("grouped convolution" in reason for reason in dense.values())
    _, dense = channel_families(FeatureExtractor())
    assert dense == {"body.3.channels": "a model output"}


def test_untraceable_module_error_names_it_and_the_adapter_to_write():
    with pytest.raises(ValueError) as error:
        build_zigs(FusedNormNet())
    message = str(error.value)
    assert "'norm1'" in message and "FusedBatchNormReLU" in message
    assert "register_channel_adapter" in message


def test_registered_adapter_makes_a_fused_module_prunable(monkeypatch):
    monkeypatch.setitem(conv._CHANNEL_ADAPTERS, FusedBatchNormReLU, ChannelAdapter("norm"))
    model = randomize_batch_norms(FusedNormNet()).eval()
    zigs = build_zigs(model)
    assert [family.name for family in zigs.families] == ["conv1.channels", "conv2.channels"]
    assert "norm1.weight" in {m.param_name for m in zigs.families[0].members}
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(pixels)
        slim, _ = prune_zero_groups(model, zigs, inplace=False)
        assert (slim(pixels) - reference).abs().max().item() <= TOLERANCE
    assert slim.norm1.num_features == slim.norm1.running_mean.numel() < 8


def test_adapter_with_a_non_zero_preserving_activation_keeps_channels_dense(monkeypatch):
    adapter = ChannelAdapter("norm", zero_preserving=lambda module: False)
    monkeypatch.setitem(conv._CHANNEL_ADAPTERS, FusedBatchNormReLU, adapter)
    _, dense = channel_families(FusedNormNet())
    assert "does not map zero to zero" in dense["conv1.channels"]


def test_adapters_are_validated():
    with pytest.raises(ValueError, match="Unknown ChannelAdapter role"):
        ChannelAdapter("activation")
    with pytest.raises(ValueError, match="must be a ChannelAdapter"):
        register_channel_adapter(nn.ReLU, "norm")


def test_example_inputs_the_model_rejects_give_a_clear_error():
    with pytest.raises(ValueError, match="Pass `example_inputs`"):
        build_zigs(tiny_vgg(), example_inputs=torch.zeros(1, 3, 5, 5))


def test_transformers_and_channel_families_do_not_mix():
    with pytest.raises(ValueError, match="not both"):
        build_zigs(tiny_vgg(), families=("heads", "channels"))


@pytest.mark.parametrize("factory", [tiny_vgg, tiny_cifar_resnet, tiny_hf_resnet], ids=["vgg", "resnet", "hf-resnet"])
def test_pruned_convnet_saves_and_reloads_with_the_same_outputs(tmp_path, factory):
    torch.manual_seed(0)
    model = randomize_batch_norms(factory()).eval()
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(2)))
    slim, _ = prune_zero_groups(model, zigs)
    save_pruned_model(slim, tmp_path / "slim")
    reloaded = load_pruned_model(tmp_path / "slim", AutoModelForImageClassification)
    pixels = images(model)
    with torch.no_grad():
        assert torch.equal(logits(reloaded, pixels), logits(slim, pixels))
    assert current_layout(reloaded) == slim.config.oto_layout
    # Plain from_pretrained cannot build the pruned shapes: it must fail loudly, not load mismatched weights.
    with pytest.raises((RuntimeError, ValueError), match=FROM_PRETRAINED_SIZE_ERROR + "|shape"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "slim")


def test_channel_layout_of_another_architecture_is_refused():
    model = tiny_hf_resnet()
    layout = {"format_version": 1, "channels": {"convnet.features.0.channels": 3}}
    with pytest.raises(ValueError, match="does not match the channel families"):
        apply_layout(model, layout)
    good = current_layout(tiny_hf_resnet())
    name = next(iter(good["channels"]))
    good["channels"][name] = 0
    with pytest.raises(ValueError, match=r"not an integer in \[1,"):
        apply_layout(model, good)


def test_hf_resnet_family_names_follow_its_modules():
    zigs = build_zigs(tiny_hf_resnet())
    assert isinstance(zigs.model, ResNetForImageClassification)
    stem = zigs.families[0]
    assert stem.name == "resnet.embedder.embedder.convolution.channels"
    # Stage 0 keeps the stem's width, so its blocks' outputs are tied to the stem through identity shortcuts.
    assert "resnet.encoder.stages.0.layers.1.layer.2.convolution.weight" in {m.param_name for m in stem.members}


def test_timm_models_prune_exactly():
    timm = pytest.importorskip("timm")
    for name in ("resnet18", "efficientnet_b0"):
        model = randomize_batch_norms(timm.create_model(name, pretrained=False, num_classes=3)).eval()
        zigs = build_zigs(model, example_inputs=torch.zeros(1, 3, 64, 64))
        zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
        pixels = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            reference = model(pixels)
            slim, _ = prune_and_measure(model, zigs, flops_inputs={"x": pixels[:1]})
            assert (slim(pixels) - reference).abs().max().item() <= TOLERANCE


class _BroadcastNet(nn.Module):
    """A channel-wise mask multiplied in (zero-preserving) and a learned bias map added (not zero-preserving)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 6, 3, padding=1)
        self.second = nn.Conv2d(6, 5, 3, padding=1)
        self.offset = nn.Parameter(torch.randn(1, 5, 1, 1))
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.first(x)) * (x.mean(1, keepdim=True) > 0).float()
        hidden = self.second(hidden) + self.offset
        return self.head(hidden.amax(dim=(2, 3)))


def test_broadcast_masks_keep_channels_prunable_and_added_parameters_keep_them_dense():
    families, dense = channel_families(_BroadcastNet())
    assert [family.name for family in families] == ["first.channels"]
    assert "second.channels" in dense and "offset" in dense["second.channels"]


class _ConvReadTwice(nn.Module):
    """A conv whose output is read by its batch norm *and* by an add: its filter must stay penalised."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(x)
        return self.head(torch.relu(self.norm(hidden) + hidden).mean((2, 3)))


def test_norm_penalty_leaves_out_filters_only_where_the_norm_alone_reads_them():
    vgg = build_zigs(tiny_vgg(), channel_penalty="norm").families[0]
    assert [m.param_name for m in vgg.members] == ["convnet.features.1.weight", "convnet.features.1.bias"]
    assert {(d.param_name, d.dim) for d in vgg.dependents} >= {
        ("convnet.features.0.weight", 0),
        ("convnet.features.0.bias", 0),
        ("convnet.features.4.weight", 1),
    }
    # The classifier's hidden linear layer has no norm: its rows stay penalised.
    assert (
        build_zigs(tiny_vgg(), channel_penalty="norm")
        .families[-1]
        .members[0]
        .param_name.endswith("classifier.0.weight")
    )
    twice = build_zigs(_ConvReadTwice(), channel_penalty="norm").families[0]
    assert "conv.weight" in {m.param_name for m in twice.members}
    # Same families and layout in both modes.
    both = [build_zigs(tiny_hf_resnet(), channel_penalty=mode) for mode in ("conv_and_norm", "norm")]
    assert [(f.name, f.num_groups) for f in both[0].families] == [(f.name, f.num_groups) for f in both[1].families]
    with pytest.raises(ValueError, match="channel_penalty must be one of"):
        build_zigs(tiny_vgg(), channel_penalty="bn")


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_channels_last_convnet_trains_with_hspg_and_prunes_exactly(variant):
    """HSPG and the sparsity reading work on `channels_last` weights (not viewable as `[groups, -1]`): the same
    steps as on a contiguous twin, zero groups stay zero, and the slim model gives the group-sparse outputs."""
    from hf_oto.optim import HSPG

    torch.manual_seed(0)
    contiguous = randomize_batch_norms(tiny_cifar_resnet()).double()  # float64: Adam would amplify rounding
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    assert any(not m.weight.is_contiguous() for m in channels_last.modules() if isinstance(m, nn.Conv2d))
    trained = []
    for model in (contiguous, channels_last):
        zigs = build_zigs(model)
        zigs.set_zero(_zero_mask(zigs, "random-half"))
        optimizer = HSPG(model.parameters(), zigs, lr=1e-2, lmbda=1e-1, init_steps=2, variant=variant)
        model.train()
        for step in range(5):
            pixels = images(model, seed=step).double()
            if model is channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            loss = logits(model, pixels).logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        trained.append((model, zigs))
    (dense, dense_zigs), (model, zigs) = trained
    for (name, a), b in zip(dense.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)
    assert zigs.num_zero_groups() == dense_zigs.num_zero_groups() > 0
    torch.testing.assert_close(zigs.group_norms(), dense_zigs.group_norms(), rtol=0, atol=1e-6)
    model.eval()
    pixels = images(model).double().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = logits(model, pixels)
        slim, _ = prune_zero_groups(model, zigs)
        assert (logits(slim, pixels) - reference).abs().max() < TOLERANCE


# ----------------------------------------------------------------------------------------------------------------
# Every transformers vision CNN (tiny configs, no hub)
# ----------------------------------------------------------------------------------------------------------------
def test_channel_discovery_does_not_use_transformers_fx(monkeypatch):
    """transformers.utils.fx is gone in transformers 5: tracing is plain torch.fx."""
    import inspect
    import sys

    monkeypatch.setitem(sys.modules, "transformers.utils.fx", None)  # importing it now raises ImportError
    assert build_zigs(tiny_hf_mobilenet()).families
    source = inspect.getsource(conv)
    assert "from transformers.utils.fx" not in source and "from transformers.utils import fx" not in source
    assert "HFTracer" not in source


@pytest.mark.parametrize(
    "factory",
    [tiny_hf_regnet, tiny_hf_efficientnet, tiny_hf_convnext, lambda: tiny_hf_convnext(2), tiny_hf_mobilenet]
    + [lambda: tiny_hf_mobilenet(2)],
    ids=["regnet", "efficientnet", "convnext", "convnext-v2", "mobilenet-v1", "mobilenet-v2"],
)
def test_transformers_cnns_save_and_reload_after_pruning(tmp_path, factory):
    """Pruned to one channel per family, a depthwise conv has `groups == 1`: the slim model still traces to the
    families of the dense one, so its layout reloads."""
    torch.manual_seed(0)
    model = randomize_batch_norms(factory()).eval()
    zigs = build_zigs(model)
    zigs.set_zero(_zero_mask(zigs, "all-but-one", seed=3))
    slim, _ = prune_zero_groups(model, zigs)
    assert current_layout(slim) == slim.config.oto_layout
    save_pruned_model(slim, tmp_path / "slim")
    reloaded = load_pruned_model(tmp_path / "slim", AutoModelForImageClassification)
    pixels = images(model)
    with torch.no_grad():
        assert torch.equal(logits(reloaded, pixels), logits(slim, pixels))


def test_convnext_prunes_its_channels_last_mlps_and_keeps_layer_normed_channels_dense():
    families, dense = channel_families(tiny_hf_convnext())
    assert [family.name for family in families] == [
        "convnext.encoder.stages.0.layers.0.pwconv1.channels",
        "convnext.encoder.stages.1.layers.0.pwconv1.channels",
        "convnext.encoder.stages.1.layers.1.pwconv1.channels",
    ]
    mlp = families[0]
    assert [(m.param_name, m.dim) for m in mlp.members] == [
        ("convnext.encoder.stages.0.layers.0.pwconv1.weight", 0),
        ("convnext.encoder.stages.0.layers.0.pwconv1.bias", 0),
    ]
    assert [(d.param_name, d.dim) for d in mlp.dependents] == [
        ("convnext.encoder.stages.0.layers.0.pwconv2.weight", 1)
    ]
    # LayerNorm normalises over the channels: a zero channel changes the mean and variance of the others.
    assert "layer_norm" in dense["convnext.embeddings.patch_embeddings.channels"]
    assert "layer_norm" in dense["convnext.encoder.stages.1.downsampling_layer.1.channels"]


def test_convnext_v2_global_response_norm_prunes_exactly_with_its_stand_in(monkeypatch):
    """GRN divides by the mean over channels of the spatial norms: a zero channel adds nothing to the sum but counts
    in the divisor. Its bias joins the group, and the pruned GRN keeps the dense divisor (the adapter's stand-in)."""
    torch.manual_seed(0)
    model = randomize_batch_norms(tiny_hf_convnext(version=2)).eval()
    zigs = build_zigs(model)
    mlp = zigs.family("convnextv2.encoder.stages.0.layers.0.pwconv1.channels")
    prefix = "convnextv2.encoder.stages.0.layers.0"
    assert (f"{prefix}.grn.bias", 3) in {(m.param_name, m.dim) for m in mlp.members}
    assert (f"{prefix}.grn.weight", 3) in {(d.param_name, d.dim) for d in mlp.dependents}
    zigs.set_zero(_zero_mask(zigs, "random-half"))
    pixels = images(model)
    with torch.no_grad():
        reference = logits(model, pixels)
        slim, _ = prune_zero_groups(model, zigs, inplace=False)
        assert (logits(slim, pixels) - reference).abs().max().item() <= TOLERANCE
        grn = slim.get_submodule(f"{prefix}.grn")
        assert isinstance(grn, conv.PrunedGlobalResponseNorm) and grn.mean_channels == mlp.num_groups
        # A second round keeps the dense divisor.
        again = build_zigs(slim)
        again.set_zero(_zero_mask(again, "all-but-one"))
        reference_again = logits(slim, pixels)
        slimmer, _ = prune_zero_groups(slim, again, inplace=False)
        assert (logits(slimmer, pixels) - reference_again).abs().max().item() <= TOLERANCE
        assert slimmer.get_submodule(f"{prefix}.grn").mean_channels == mlp.num_groups
        # Without the stand-in, the pruned GRN divides by the kept count: not the group-sparse outputs.
        adapter = conv.get_channel_adapter(model.get_submodule(f"{prefix}.grn"))
        monkeypatch.setitem(
            conv._CHANNEL_ADAPTERS, type(model.get_submodule(f"{prefix}.grn")), replace(adapter, stand_in=None)
        )
        plain, _ = prune_zero_groups(model, zigs, inplace=False)
        assert (logits(plain, pixels) - reference).abs().max().item() > 1e-3


def test_squeeze_excite_gates_join_the_family_they_gate():
    zigs = build_zigs(tiny_hf_efficientnet())
    expanded = zigs.family("efficientnet.encoder.blocks.1.expansion.expand_conv.channels")
    members = {m.param_name for m in expanded.members}
    prefix = "efficientnet.encoder.blocks.1"
    # the depthwise conv and its norm, and the rows of the gate's expand conv (sigmoid(0) = 0.5, times zero = 0)
    assert {
        f"{prefix}.depthwise_conv.depthwise_conv.weight",
        f"{prefix}.depthwise_conv.depthwise_norm.weight",
        f"{prefix}.squeeze_excite.expand.weight",
        f"{prefix}.squeeze_excite.expand.bias",
    } <= members
    readers = {d.param_name for d in expanded.dependents}
    assert {f"{prefix}.squeeze_excite.reduce.weight", f"{prefix}.projection.project_conv.weight"} <= readers
    assert zigs.family(f"{prefix}.squeeze_excite.reduce.channels").num_groups == 2


def test_grouped_convolutions_of_regnet_are_kept_dense():
    families, dense = channel_families(tiny_hf_regnet())
    assert "grouped convolution" in dense["regnet.encoder.stages.0.layers.0.layer.0.convolution.channels"]
    assert "regnet.encoder.stages.0.layers.0.layer.3.convolution.channels" in {f.name for f in families}


class _GateReadByConv(nn.Module):
    """A sigmoid output read by a convolution: a zeroed channel reads 0.5 there, so it must stay dense."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 6, 3, padding=1)
        self.second = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.sigmoid(self.first(x)))).mean((2, 3)))


def test_a_layer_reading_a_sigmoid_keeps_its_channels_dense():
    families, dense = channel_families(_GateReadByConv())
    assert [family.name for family in families] == ["second.channels"]
    assert "does not make zero" in dense["first.channels"]


class _ShapeDependentPadding(nn.Module):
    """Python control flow on shapes (TensorFlow "SAME" padding): traced with the example inputs' shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 == 0:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.head(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_shape_dependent_control_flow_traces():
    assert [family.name for family in build_zigs(_ShapeDependentPadding()).families] == ["conv.channels"]


# ----------------------------------------------------------------------------------------------------------------
# timm layers: local stand-ins named and structured like timm's (timm itself is not installed on the project's
# machines); their `__module__` is timm's, so the adapters hf_oto registers by qualified name apply to them.
# ----------------------------------------------------------------------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: TensorFlow "SAME" padding computed from the input size in forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 1, groups, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.size()[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(size // -stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        x = nn.functional.pad(x, pads)
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: `F.batch_norm` on its own attributes, then `drop` and `act`."""

    def __init__(self, num_features: int, act_layer: type = nn.SiLU, apply_act: bool = True):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )
        return self.act(self.drop(x))


class SqueezeExcite(nn.Module):
    """timm.models._efficientnet_blocks.SqueezeExcite: mean, reduce, act, expand, sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(x_se)


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.norm.LayerNorm2d: a LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


Conv2dSame.__module__ = "timm.layers.conv2d_same"
BatchNormAct2d.__module__ = "timm.layers.norm_act"
SqueezeExcite.__module__ = "timm.models._efficientnet_blocks"
LayerNorm2d.__module__ = "timm.layers.norm"


class TimmStyleNet(nn.Module):
    """An EfficientNet-style block and a ConvNeXt-style norm built from the timm stand-ins."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), BatchNormAct2d(8))
        self.block = nn.Sequential(
            Conv2dSame(8, 8, 3, groups=8),  # depthwise
            BatchNormAct2d(8),
            SqueezeExcite(8, 3),
            nn.Conv2d(8, 8, 1, bias=False),
            BatchNormAct2d(8, apply_act=False),
        )
        self.widen = nn.Sequential(nn.Conv2d(8, 12, 1), BatchNormAct2d(12, act_layer=nn.ReLU))
        self.normed = nn.Sequential(nn.Conv2d(12, 10, 3, padding=1), LayerNorm2d(10))
        self.last = nn.Sequential(nn.Conv2d(10, 6, 1), BatchNormAct2d(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(x)
        hidden = hidden + self.block(hidden)
        hidden = self.last(self.normed(self.widen(hidden)))
        return self.head(hidden.mean((2, 3)))


def _randomize_timm_style(model: nn.Module) -> nn.Module:
    randomize_batch_norms(model)  # the stand-ins are nn.BatchNorm2d subclasses
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, LayerNorm2d):
            module.weight.data.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
            module.bias.data.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model


def test_timm_adapters_are_registered_by_qualified_name():
    assert conv.get_channel_adapter(Conv2dSame(3, 4, 3)).role == "conv"
    assert conv.get_channel_adapter(BatchNormAct2d(4)).role == "norm"
    assert conv.get_channel_adapter(SqueezeExcite(4, 2)) is None  # traced through: its gate is a sigmoid product
    assert conv.get_channel_adapter(LayerNorm2d(4)) is None  # traced through: `layer_norm` keeps channels dense


def test_timm_style_layers_give_exact_families():
    model = TimmStyleNet()
    families, dense = channel_families(model)
    by_name = {family.name: family for family in families}
    assert set(by_name) == {"stem.0.channels", "block.2.conv_reduce.channels", "widen.0.channels", "last.0.channels"}
    stem = by_name["stem.0.channels"]
    members = {m.param_name for m in stem.members}
    # the depthwise Conv2dSame, both BatchNormAct2d, the gate's expand rows and the residual branch's projection
    assert {"stem.1.weight", "block.0.weight", "block.1.weight", "block.2.conv_expand.weight"} <= members
    assert {"block.3.weight", "block.4.weight"} <= members
    assert set(stem.meta["buffers"]) >= {"stem.1.running_mean", "block.1.running_var", "block.4.running_mean"}
    assert "layer_norm" in dense["normed.0.channels"]


@pytest.mark.parametrize("pattern", ["random-half", "whole-families", "all-but-one"])
def test_timm_style_layers_prune_exactly(pattern):
    torch.manual_seed(0)
    model = _randomize_timm_style(TimmStyleNet()).eval()
    zigs = build_zigs(model)
    zigs.set_zero(_zero_mask(zigs, pattern))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(pixels)
        slim, report = prune_and_measure(model, zigs, inplace=False)
        assert (slim(pixels) - reference).abs().max().item() <= TOLERANCE
    _assert_sizes_match_weights(slim)
    assert report.params_after < report.params_before
    assert slim.block[0].groups == slim.block[0].in_channels == slim.block[0].out_channels


def test_without_its_adapter_a_timm_batch_norm_act_keeps_its_channels_dense(monkeypatch):
    """Traced into, BatchNormAct2d is `F.batch_norm` on attributes: not attributable to channels, so dense."""
    monkeypatch.delitem(conv._CHANNEL_ADAPTERS, "timm.layers.norm_act.BatchNormAct2d")
    families, dense = channel_families(TimmStyleNet())
    assert "batch_norm" in dense["stem.0.channels"]
    assert "last.0.channels" not in {family.name for family in families}


def test_scaled_config_is_the_uniformly_thinner_network_at_about_the_square_of_the_flops():
    from hf_oto.report import measure_model

    full = CifarConvNetConfig.resnet18(num_labels=10)
    thin = full.scaled(0.5)
    assert (thin.widths, thin.stem_width, thin.depths) == ([32, 64, 128, 256], 32, full.depths)
    assert full.widths == [64, 128, 256, 512]  # the original is left as it was
    flops = [measure_model(CifarConvNetForImageClassification(config)).flops for config in (full, thin)]
    assert 0.24 < flops[1] / flops[0] < 0.27
    with pytest.raises(ValueError, match="width_multiplier must be a positive number"):
        full.scaled(0)
