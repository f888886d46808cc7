"""OTOLayout (the one record of what a model keeps), the group-kind registry, and the module boundaries of the
finishing step (save never exports, export never loads folders)."""

import ast
from pathlib import Path

import pytest
import torch
import torch.fx

import hf_oto.layout
from hf_oto import build_zigs, load_pruned_model, prune_zero_groups, save_pruned_model
from hf_oto.group_kinds import GROUP_KINDS, GroupKind, kind_of, register_group_kind, report_columns
from hf_oto.layout import LAYOUT_FORMAT_VERSION, OTOLayout, read_layout
from hf_oto.zig.groups import ZIGFamily, ZIGMember, ZIGSet

from .test_pruning import sparse_masks
from .tiny_convnets import TINY_CONVNET_FACTORIES, randomize_batch_norms
from .tiny_models import TINY_MODEL_FACTORIES, tiny_model


def test_layout_round_trips_through_its_dict_form():
    gqa = {
        "format_version": 1,
        "num_attention_heads": [4, 0],
        "num_key_value_heads": [2, 0],
        "intermediate_size": [7, 3],
    }
    layout = OTOLayout.from_dict(gqa)
    assert layout.is_transformer and layout.num_layers == 2 and layout.num_key_value_heads == (2, 0)
    assert layout.to_dict() == gqa
    channels = {"format_version": 1, "channels": {"a.channels": 3, "b.channels": 1}}
    assert OTOLayout.from_dict(channels).to_dict() == channels
    assert not OTOLayout.from_dict(channels).is_transformer
    assert OTOLayout.from_dict(layout) is layout
    assert layout.summary() == {"heads": 4, "FFN rows": 10}


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1, 2], "must be a dict"),
        ({"format_version": 2, "num_attention_heads": [1], "intermediate_size": [1]}, "format_version=2"),
        ({"format_version": 1, "intermediate_size": [1]}, "num_attention_heads"),
        ({"format_version": 1, "num_attention_heads": "4", "intermediate_size": [1]}, "one size per layer"),
        ({"format_version": 1, "channels": [3]}, "must map channel family names"),
    ],
)
def test_malformed_layouts_are_refused_with_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        OTOLayout.from_dict(bad)


def test_validate_against_names_the_entry_that_does_not_fit():
    dense = OTOLayout(num_attention_heads=[4, 4], intermediate_size=[37, 37])
    OTOLayout(num_attention_heads=[0, 4], intermediate_size=[1, 37]).validate_against(dense)
    with pytest.raises(ValueError, match=r"\['intermediate_size'\]\[1\] = 38 is not an integer in \[0, 37\]"):
        OTOLayout(num_attention_heads=[4, 4], intermediate_size=[37, 38]).validate_against(dense)
    with pytest.raises(ValueError, match="one size per layer"):
        OTOLayout(num_attention_heads=[4], intermediate_size=[37]).validate_against(dense)
    with pytest.raises(ValueError, match="convolutional network"):
        OTOLayout(num_attention_heads=[4, 4], intermediate_size=[3, 3]).validate_against(OTOLayout(channels={"a": 2}))
    with pytest.raises(ValueError, match="the layout lacks"):
        OTOLayout(channels={"a": 1}).validate_against(OTOLayout(channels={"a": 2, "b": 2}))
    with pytest.raises(ValueError, match=r"\['a'\] = 0 is not an integer in \[1, 2\]"):
        OTOLayout(channels={"a": 0}).validate_against(OTOLayout(channels={"a": 2}))


@pytest.mark.parametrize("name", sorted(TINY_MODEL_FACTORIES))
def test_the_layout_pruning_computes_from_the_zigs_is_what_the_slim_modules_compute(name):
    """The slim layout comes from the ZIGs and the kept groups, never from the modules: it must still be exactly what
    the slim model's modules compute, on every transformer the code claims (GQA included)."""
    model = tiny_model(name).eval()
    zigs = build_zigs(model)
    assert zigs.layout == read_layout(model)
    zigs.set_zero(sparse_masks(zigs))
    slim, layout = prune_zero_groups(model, zigs, inplace=False)
    assert layout == read_layout(slim)
    assert slim.config.oto_layout == layout.to_dict()
    assert layout.num_attention_heads[0] == 0  # sparse_masks empties layer 0's heads


def test_excluded_layers_keep_their_sizes_in_the_layout():
    model = tiny_model("bert").eval()
    zigs = build_zigs(model, exclude=["*.layer.1.*"])
    zigs.set_zero(torch.ones(len(zigs), dtype=torch.bool))
    slim, layout = prune_zero_groups(model, zigs, inplace=False)
    dense = read_layout(model)
    kept = lambda sizes: tuple(size if index == 1 else 0 for index, size in enumerate(sizes))  # noqa: E731
    assert layout.num_attention_heads == kept(dense.num_attention_heads)
    assert layout.intermediate_size == kept(dense.intermediate_size)
    assert layout == read_layout(slim)


@pytest.mark.parametrize("name", sorted(TINY_CONVNET_FACTORIES))
def test_a_convnet_is_traced_once_to_build_prune_and_save_and_once_to_load(name, monkeypatch, tmp_path):
    traces = []
    original = torch.fx.Tracer.trace

    def counting_trace(self, *args, **kwargs):
        traces.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting_trace)
    model = randomize_batch_norms(TINY_CONVNET_FACTORIES[name]()).eval()
    zigs = build_zigs(model)
    assert len(traces) == 1
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    masks = zigs.family_zero_masks()
    expected = {family.name: max(int((~masks[family.name]).sum()), 1) for family in zigs.families}
    slim, layout = prune_zero_groups(model, zigs)
    assert len(traces) == 1, "pruning must not re-trace: the layout comes from the ZIGs"
    assert layout.channels == expected
    if not hasattr(slim, "save_pretrained"):
        return
    save_pruned_model(slim, tmp_path / "slim")
    assert len(traces) == 1, "saving must not re-trace: it writes the recorded layout"
    load_pruned_model(tmp_path / "slim", type(slim))
    assert len(traces) == 2  # a fresh model must be traced once to find its families


def test_an_unregistered_kind_is_refused_naming_the_registry():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    family = zigs.families[0]
    odd = ZIGFamily(
        name="odd.experts", kind="experts", num_groups=family.num_groups, members=family.members, layer=0, module=""
    )
    with pytest.raises(ValueError, match="kind 'experts'.*register_group_kind"):
        prune_zero_groups(model, ZIGSet(model, [odd]))
    with pytest.raises(ValueError, match="GroupKind instance"):
        register_group_kind("experts")


def test_a_new_kind_is_one_registered_class(monkeypatch):
    """Adding a kind of group = one GroupKind subclass: pruning, the layout and the report columns ask it."""

    class BiasRows(GroupKind):
        name, label, card_label = "bias_rows", "bias rows", "bias rows"

        def layout_entries(self, family, kept):
            return [("intermediate_size", family.layer, kept)]

        def columns(self, layout):
            return [("bias rows", dict(enumerate(layout.intermediate_size)))] if layout.is_transformer else []

    monkeypatch.setitem(GROUP_KINDS, "bias_rows", BiasRows())
    model = tiny_model("bert").eval()
    up = "bert.encoder.layer.0.intermediate.dense"
    size = model.get_submodule(up).out_features
    family = ZIGFamily(
        name="layer0.bias_rows",
        kind="bias_rows",
        num_groups=size,
        members=(ZIGMember(f"{up}.weight", 0), ZIGMember(f"{up}.bias", 0)),
        dependents=(ZIGMember("bert.encoder.layer.0.output.dense.weight", 1),),
        layer=0,
    )
    zigs = ZIGSet(model, [family], layout=read_layout(model))
    zigs.set_zero(torch.arange(size) % 2 == 0)
    slim, layout = prune_zero_groups(model, zigs)
    assert kind_of(family).label == "bias rows"
    assert layout.intermediate_size[0] == size // 2 == slim.get_submodule(up).out_features
    _, columns = report_columns(layout)
    assert [title for _, title, _ in columns] == ["heads", "FFN rows", "bias rows"]


def test_layout_format_version_is_the_one_written():
    model = tiny_model("llama").eval()
    zigs = build_zigs(model)
    _, layout = prune_zero_groups(model, zigs, inplace=False)
    assert layout.to_dict()["format_version"] == LAYOUT_FORMAT_VERSION
    assert hf_oto.layout.model_layout(model) == read_layout(model)  # nothing recorded: read from the modules


@pytest.mark.parametrize(
    "module, must_not_import",
    [
        ("modeling", {"onnx", "speedup", "run_outputs"}),
        ("onnx", {"modeling", "speedup", "run_outputs"}),
        ("pruning", {"modeling", "onnx", "speedup"}),
        ("layout", {"modeling", "onnx", "pruning"}),
    ],
)
def test_save_and_export_do_not_import_each_other(module, must_not_import):
    """Save never exports, export never loads folders: neither module imports the other anywhere in its source (also
    not lazily inside a function); `hf_oto.speedup` and the finishing step (`hf_oto.run_outputs`) join them."""
    source = (Path(hf_oto.layout.__file__).parent / f"{module}.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.add((node.module or "").split(".")[0])
            imported.update(alias.name for alias in node.names if not node.module)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_oto."):
            imported.add(node.module.split(".")[1])
    assert not imported & must_not_import, f"hf_oto/{module}.py imports {sorted(imported & must_not_import)}"
