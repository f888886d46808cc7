"""ONNX export of slim (pruned) models through Optimum.

A model pruned by [`~hf_oto.pruning.prune_zero_groups`] is an ordinary transformers model whose layers compute fewer
heads and FFN rows than `config.num_attention_heads` and `config.intermediate_size` say. Optimum's exporter traces the
modules themselves, so the exported graph carries the per-layer sizes in its weights and reshape constants, and the
folder loads with Optimum's `ORTModelFor*` classes without hf_oto:

- [`export_onnx`] exports through `optimum.exporters.onnx.onnx_export_from_model`, then checks the ONNX Runtime
  outputs against the PyTorch model's. Decoder-only models are exported without a key/value cache by default: the
  cache inputs of Optimum's `-with-past` export (and the empty cache `ORTModelForCausalLM` builds for the first step)
  have one head count for all layers, taken from the config, which a pruned model no longer has.
- [`export_onnx_subfolder`] writes the `onnx/` subfolder of a checkpoint saved by
  [`~hf_oto.modeling.save_pruned_model`].

Exporting takes model objects and never loads folders (that is [`~hf_oto.modeling.load_model_folder`]); the latency
benchmark that joins both is [`hf_oto.speedup.benchmark_speedup`].
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .atomic_folder import atomic_folder, check_replaceable
from .flops import image_size


logger = logging.get_logger(__name__)

ONNX_SUBFOLDER = "onnx"
"""Name of the subfolder [`export_onnx_subfolder`] writes next to a saved pruned checkpoint."""

ONNX_FILE_NAME = "model.onnx"

ORT_MODEL_CLASSES = {
    "feature-extraction": "ORTModelForFeatureExtraction",
    "fill-mask": "ORTModelForMaskedLM",
    "text-classification": "ORTModelForSequenceClassification",
    "token-classification": "ORTModelForTokenClassification",
    "question-answering": "ORTModelForQuestionAnswering",
    "multiple-choice": "ORTModelForMultipleChoice",
    "text-generation": "ORTModelForCausalLM",
    "text-generation-with-past": "ORTModelForCausalLM",
    "image-classification": "ORTModelForImageClassification",
}
"""The `optimum.onnxruntime` class that loads an export of each task."""


def _require_optimum() -> None:
    missing = [name for name in ("optimum.exporters.onnx", "onnxruntime") if not _module_available(name)]
    if missing:
        raise ImportError(
            f"ONNX export and benchmarks need {missing}; install them with `pip install 'hf_oto[onnx]'` "
            "(optimum[onnxruntime])."
        )
    register_onnx_configs()


HF_OTO_ONNX_TASKS = {"hf-oto-cifar-convnet": ("image-classification",)}
"""The model types hf_oto defines, with the Optimum export tasks [`register_onnx_configs`] registers for them."""

_registered_onnx_configs = False


def register_onnx_configs() -> None:
    """Registers Optimum ONNX export configs for the model types hf_oto defines (see `HF_OTO_ONNX_TASKS`).

    Optimum's exporter (`onnx_export_from_model`, `optimum-cli export onnx`) and `TasksManager` know only the model
    types Optimum ships configs for. This adds `hf-oto-cifar-convnet` (the CIFAR-layout VGG and ResNet of
    `hf_oto.models`) for `image-classification`: one `pixel_values` input with a dynamic batch axis (the VGG classifier
    flattens a feature map of the config's `image_size`, so height and width are fixed) and the `logits` output.
    Called by [`export_onnx`], [`resolve_task`] and [`benchmark_speedup`]; calling it again does nothing. An export
    loads with `optimum.onnxruntime.ORTModelForImageClassification` once `hf_oto` is imported (which registers the
    config class with `AutoConfig`).

    Example:

    ```python
    >>> from optimum.exporters.tasks import TasksManager
    >>> from hf_oto.onnx import register_onnx_configs

    >>> register_onnx_configs()
    >>> list(TasksManager.get_supported_tasks_for_model_type("hf-oto-cifar-convnet", "onnx", library_name="transformers"))
    ['image-classification']
    ```
    """
    global _registered_onnx_configs
    if _registered_onnx_configs:
        return
    from optimum.exporters.onnx.model_configs import ViTOnnxConfig
    from optimum.exporters.tasks import TasksManager

    class CifarConvNetOnnxConfig(ViTOnnxConfig):
        """Optimum ONNX config of `hf_oto.models.CifarConvNetForImageClassification`: pixels in, logits out."""

        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return {"pixel_values": {0: "batch_size"}}

    register = TasksManager.create_register("onnx", overwrite_existing=True)
    for model_type, tasks in HF_OTO_ONNX_TASKS.items():
        register(model_type, *tasks)(CifarConvNetOnnxConfig)
    _registered_onnx_configs = True


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
def _kv_heads_per_layer(model: nn.Module) -> list[int] | None:
    """Key/value heads each layer computes, or `None` when the model type has no hf_oto layout."""
    from .layout import model_layout
    from .zig.transformers import TRANSFORMER_LAYOUTS

    if getattr(model.config, "model_type", None) not in TRANSFORMER_LAYOUTS:
        return None
    layout = model_layout(model)
    return list(layout.num_key_value_heads or layout.num_attention_heads)


def resolve_task(model: nn.Module, task: str | None = None) -> str:
    """The Optimum export task of `model`: `task` checked against what Optimum supports, or inferred from its class.

    An inferred task never has the `-with-past` suffix (see [`export_onnx`]).

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to export.
        task (`str`, *optional*): An Optimum task name (e.g. `"text-classification"`); `None` or `"auto"` to infer it.

    Returns:
        `str`: the task.

    Example:

    ```python
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_oto.onnx import resolve_task

    >>> resolve_task(BertForSequenceClassification(BertConfig(hidden_size=32, num_attention_heads=4)))
    'text-classification'
    ```
    """
    _require_optimum()
    from optimum.exporters.tasks import TasksManager

    # Optimum's table spells some types as transformers does (`mobilenet_v2`, `gpt_neo`), others with hyphens
    # (`deberta-v2`, `hf-oto-cifar-convnet`): try the model's own spelling first.
    model_type = model.config.model_type
    try:
        supported = list(
            TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        )
    except KeyError:
        model_type = model_type.replace("_", "-")
        supported = list(
            TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        )
    if (task is None or task == "auto") and model_type in HF_OTO_ONNX_TASKS:
        task = HF_OTO_ONNX_TASKS[model_type][0]  # Optimum infers tasks from the class names it knows
    if task is None or task == "auto":
        try:
            task = TasksManager._infer_task_from_model_or_model_class(model=model)
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"Could not infer the export task of {type(model).__name__}; pass `task=` one of {supported}."
            ) from error
    task = TasksManager.map_from_synonym(task)
    if task not in supported:
        raise ValueError(
            f"Task {task!r} is not supported by Optimum's ONNX exporter for model_type={model.config.model_type!r}; "
            f"pass one of {supported}."
        )
    return task


def _check_past_supported(model: nn.Module, task: str) -> None:
    if not task.endswith("-with-past"):
        return
    kv_heads = _kv_heads_per_layer(model)
    if kv_heads is None:
        return
    config = model.config
    expected = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if any(heads != expected for heads in kv_heads):
        raise ValueError(
            f"Task {task!r} exports a key/value cache with {expected} heads in every layer (from the config), but the "
            f"pruned model has {kv_heads} key/value heads per layer; neither Optimum's exporter nor ORTModelForCausalLM "
            f"can handle per-layer cache sizes. Export with task={task.removesuffix('-with-past')!r} (no cache)."
        )


def _dummy_feed(input_names: list[str], config: Any, batch_size: int, seq_length: int, *, seed: int = 0, pad: bool):
    """Numpy inputs for an exported text model: random token ids, an attention mask (padded tail on row 0 if `pad`)."""
    rng = np.random.default_rng(seed)
    vocab_size = int(getattr(config, "vocab_size", 100))
    low = min(3, vocab_size - 1)
    feed: dict[str, np.ndarray] = {}
    for name in input_names:
        if name == "input_ids":
            feed[name] = rng.integers(low, vocab_size, size=(batch_size, seq_length), dtype=np.int64)
        elif name == "attention_mask":
            mask = np.ones((batch_size, seq_length), dtype=np.int64)
            if pad and seq_length > 2:
                mask[0, -2:] = 0
            feed[name] = mask
        elif name == "token_type_ids":
            feed[name] = np.zeros((batch_size, seq_length), dtype=np.int64)
        elif name == "position_ids":
            feed[name] = np.broadcast_to(np.arange(seq_length, dtype=np.int64), (batch_size, seq_length)).copy()
        elif name == "pixel_values":
            channels = getattr(config, "num_channels", 3)
            feed[name] = rng.standard_normal((batch_size, channels, *image_size(config))).astype(np.float32)
        else:
            raise ValueError(
                f"The exported model takes an input {name!r} that hf_oto cannot make up; supported inputs are "
                "input_ids, attention_mask, token_type_ids, position_ids and pixel_values."
            )
    return feed


def _session(path: Path, num_threads: int | None = None, allow_spinning: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx_outputs(model: nn.Module, directory: str | os.PathLike, *, atol: float = 1e-4, seq_length: int = 8):
    """Runs the PyTorch model and the exported ONNX model on the same inputs and checks that their outputs agree.

    Args:
        model ([`~transformers.PreTrainedModel`]): The exported model.
        directory (`str` or `os.PathLike`): The folder written by [`export_onnx`].
        atol (`float`, *optional*, defaults to 1e-4): Largest allowed absolute difference.
        seq_length (`int`, *optional*, defaults to 8): Length of the test sequences (batch 2, one padded row).

    Returns:
        `dict[str, float]`: the largest absolute difference of every compared output.

    Example:

    ```python
    >>> from hf_oto.onnx import check_onnx_outputs

    >>> check_onnx_outputs(slim_model, "my-pruned-bert/onnx")  # doctest: +SKIP
    {'logits': 2.9e-07}
    ```
    """
    session = _session(Path(directory) / ONNX_FILE_NAME)
    input_names = [i.name for i in session.get_inputs()]
    feed = _dummy_feed(input_names, model.config, 2, seq_length, pad=True)
    output_names = [o.name for o in session.get_outputs()]
    onnx_outputs = dict(zip(output_names, session.run(None, feed)))
    was_training = model.training
    model.eval()
    try:
        torch_outputs = model(**{name: torch.from_numpy(value) for name, value in feed.items()})
    finally:
        model.train(was_training)
    differences: dict[str, float] = {}
    for name, value in onnx_outputs.items():
        reference = torch_outputs.get(name) if isinstance(torch_outputs, Mapping) else None
        if not isinstance(reference, torch.Tensor):
            continue
        reference = reference.float().numpy()
        if reference.shape != value.shape:
            raise ValueError(
                f"ONNX output {name!r} has shape {value.shape} but the PyTorch model gives {reference.shape}; the "
                "export does not match the model. Please report this with the model's config."
            )
        if not (np.isfinite(reference).all() and np.isfinite(value).all()):
            raise ValueError(
                f"Output {name!r} holds NaN or infinite values (PyTorch: {int((~np.isfinite(reference)).sum())}, ONNX: "
                f"{int((~np.isfinite(value)).sum())}), so the export cannot be checked: fix the model's weights first."
            )
        differences[name] = float(np.abs(reference - value).max()) if value.size else 0.0
    if not differences:
        raise ValueError(f"None of the ONNX outputs {output_names} is an output of {type(model).__name__}.")
    bad = {name: diff for name, diff in differences.items() if not diff <= atol}
    if bad:
        raise ValueError(
            f"The ONNX export in {str(directory)!r} differs from the PyTorch model by {bad} (atol={atol}). Re-export "
            "with `validate=False` to keep it anyway, or raise `atol` if the model runs in reduced precision."
        )
    return differences


def export_onnx(
    model: nn.Module,
    directory: str | os.PathLike,
    task: str | None = None,
    opset: int | None = None,
    *,
    tokenizer: Any | None = None,
    validate: bool = True,
    atol: float = 1e-4,
    overwrite: bool = False,
    **export_kwargs: Any,
) -> Path:
    """Exports a slim (pruned) or dense model to ONNX through Optimum, loadable with `optimum.onnxruntime.ORTModelFor*`.

    The export traces the model's own modules (`optimum.exporters.onnx.onnx_export_from_model`), so every layer keeps
    the number of heads and FFN rows it computes; the dummy inputs depend only on the vocabulary and sequence shapes, not
    on the config's head counts. Layers without heads (a [`~hf_oto.pruning.PrunedAttention`] stand-in) and without FFN
    rows export as the bias-only products they are. The folder gets `model.onnx`, `config.json` (with `oto_layout`) and
    the tokenizer if given; with `validate=True` the ONNX Runtime outputs are checked against the model's.

    Decoder-only models (Llama, Mistral, Qwen2) export without a key/value cache unless `task` ends in `-with-past`,
    which is only possible while every layer keeps the config's number of key/value heads. Load such an export with
    `ORTModelForCausalLM.from_pretrained(directory, use_cache=False)`.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The model to export, e.g. from [`~hf_oto.pruning.prune_zero_groups`] or
            [`~hf_oto.modeling.load_pruned_model`]. Exported in eval mode.
        directory (`str` or `os.PathLike`):
            Output folder; created if missing.
        task (`str`, *optional*):
            Optimum task (`"text-classification"`, `"question-answering"`, `"feature-extraction"`,
            `"text-generation"`, ...); inferred from the model class when `None`.
        opset (`int`, *optional*):
            ONNX opset; Optimum's default for the architecture when `None`.
        tokenizer (*optional*):
            A tokenizer saved into the folder, so `ORTModelFor*` pipelines find it.
        validate (`bool`, *optional*, defaults to `True`):
            Compare ONNX Runtime and PyTorch outputs on a padded batch and raise if they differ by more than `atol`.
        atol (`float`, *optional*, defaults to 1e-4):
            Tolerance of the validation.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty folder. The export is written into a temporary sibling folder and swapped in once
            complete and validated, so the WHOLE folder is replaced (files that are not part of the export go too).
        export_kwargs:
            Passed on to `onnx_export_from_model` (e.g. `optimize="O1"`, `do_constant_folding=False`).

    Returns:
        `Path`: the folder.

    Example:

    ```python
    >>> from optimum.onnxruntime import ORTModelForSequenceClassification
    >>> from hf_oto.onnx import export_onnx

    >>> export_onnx(slim_model, "slim-onnx", task="text-classification")  # doctest: +SKIP
    >>> ort_model = ORTModelForSequenceClassification.from_pretrained("slim-onnx")  # doctest: +SKIP
    ```
    """
    _require_optimum()
    from optimum.exporters.onnx import onnx_export_from_model

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(
            f"export_onnx needs a transformers PreTrainedModel; got {type(model).__name__}. Load a saved folder with "
            "`hf_oto.modeling.load_pruned_model` first."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is a file, not a folder; choose a folder path for the ONNX export.")
    if (directory / ONNX_FILE_NAME).exists() and not overwrite:
        raise ValueError(
            f"{str(directory / ONNX_FILE_NAME)!r} already exists. Choose another folder or pass `overwrite=True` (the "
            "whole folder is replaced)."
        )
    check_replaceable(directory, overwrite=overwrite, what="ONNX export")
    if atol <= 0:
        raise ValueError(f"atol must be positive; got {atol}.")
    task = resolve_task(model, task)
    _check_past_supported(model, task)
    # Exported, validated, then swapped in whole: a failed export leaves the previous folder as it was.
    with atomic_folder(directory, overwrite=overwrite, what="ONNX export") as staging:
        was_training = model.training
        model.eval()
        try:
            if model.config.model_type in HF_OTO_ONNX_TASKS:
                _export_hf_oto_model(model, staging, task, opset, **export_kwargs)
            else:
                onnx_export_from_model(
                    model, staging, opset=opset, task=task, do_validation=False, monolith=True, **export_kwargs
                )
        finally:
            model.train(was_training)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if validate:
            differences = check_onnx_outputs(model, staging, atol=atol)
            logger.info(f"ONNX export of {directory} matches the PyTorch model (max abs differences {differences}).")
    logger.info(f"Exported {type(model).__name__} for {task!r} to {directory}.")
    return directory


_HF_OTO_EXPORT_KWARGS = ("do_constant_folding", "no_dynamic_axes", "input_shapes")


def _export_hf_oto_model(
    model: nn.Module, directory: Path, task: str, opset: int | None = None, **export_kwargs: Any
) -> None:
    """Exports a model of a type hf_oto defines (`HF_OTO_ONNX_TASKS`) with Optimum's `export` and the config that
    [`register_onnx_configs`] registered, into the folder layout of `onnx_export_from_model` (`model.onnx`,
    `config.json`). `onnx_export_from_model` itself refuses such models: it infers the library of a model from the
    module of its class, which is `hf_oto`, not `transformers`."""
    from optimum.exporters.onnx import export
    from optimum.exporters.tasks import TasksManager

    model_type = model.config.model_type
    if export_kwargs.get("optimize") is not None:
        raise ValueError(
            f"optimize={export_kwargs['optimize']!r} is not available for model_type={model_type!r}: Optimum's "
            "ORTOptimizer only knows transformer model types, and its O1-O3 levels fuse attention and GELU, which a "
            "conv net has none of (the ONNX Runtime session fuses Conv + BatchNorm + ReLU by itself). Drop `optimize`."
        )
    export_kwargs.pop("optimize", None)
    unknown = sorted(set(export_kwargs) - set(_HF_OTO_EXPORT_KWARGS))
    if unknown:
        raise ValueError(
            f"Export options {unknown} are not supported for model_type={model_type!r} (hf_oto exports it with "
            f"Optimum's `export`, not `onnx_export_from_model`); drop them or use only {list(_HF_OTO_EXPORT_KWARGS)}."
        )
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", task=task, model_type=model_type, library_name="transformers"
    )
    onnx_config = constructor(model.config, task=task)
    directory.mkdir(parents=True, exist_ok=True)
    opset = opset or onnx_config.DEFAULT_ONNX_OPSET
    export(model, onnx_config, directory / ONNX_FILE_NAME, opset=opset, **export_kwargs)
    model.config.save_pretrained(directory)


def export_onnx_subfolder(
    model: nn.Module, directory: str | os.PathLike, tokenizer: Any | None = None, **kwargs: Any
) -> Path:
    """Exports `model` to the `onnx/` subfolder of a checkpoint folder written by
    [`~hf_oto.modeling.save_pruned_model`] (what `--export_onnx` of the training scripts does after saving).

    Args:
        model ([`~transformers.PreTrainedModel`]): The saved model.
        directory (`str` or `os.PathLike`): The checkpoint folder; the export goes to `directory/onnx`.
        tokenizer (*optional*): Saved into the subfolder too.
        kwargs: Passed on to [`export_onnx`] (`task`, `opset`, ...); `overwrite` defaults to `True` here.

    Returns:
        `Path`: the `onnx/` subfolder.

    Example:

    ```python
    >>> from hf_oto.onnx import export_onnx_subfolder

    >>> export_onnx_subfolder(slim_model, "my-pruned-bert", tokenizer)  # doctest: +SKIP
    PosixPath('my-pruned-bert/onnx')
    ```
    """
    kwargs.setdefault("overwrite", True)
    return export_onnx(model, Path(directory) / ONNX_SUBFOLDER, tokenizer=tokenizer, **kwargs)
