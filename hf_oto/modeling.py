"""Pruned checkpoints in the Hugging Face Hub format.

A pruned model is saved as a normal transformers folder (`config.json` with the per-layer sizes in `oto_layout`,
`model.safetensors`, tokenizer files). Its tensors have the pruned shapes, so plain `from_pretrained` refuses it with a
size mismatch; [`load_pruned_model`] builds the dense model from the config, reshapes it to the recorded layout with
[`~hf_oto.pruning.apply_layout`] and loads the weights strictly.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import logging

from .atomic_folder import atomic_folder, check_replaceable
from .layout import model_layout
from .pruning import apply_layout


logger = logging.get_logger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"


def save_pruned_model(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    tokenizer: Any | None = None,
    *,
    overwrite: bool = False,
    safe_serialization: bool = True,
    write_extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Saves a pruned model (and its tokenizer) as a normal Hugging Face folder, atomically.

    The layout pruning recorded in `model.config.oto_layout` (read from the modules for a model pruning did not
    record one for) is written to `config.json`; the weights go to `model.safetensors` (tensors of layers without heads keep their 0-size q/k/v
    entries, so the state-dict keys are those of the dense model). Reload with [`load_pruned_model`].

    Everything is written into a temporary sibling folder that replaces `directory` only once complete (see
    [`~hf_oto.atomic_folder.atomic_folder`]): a save that fails or is killed leaves the previous folder as it was,
    and an overwrite leaves no stale file of the previous model (e.g. a `model.safetensors` next to a new
    `pytorch_model.bin`, or an old shard index) that would win at load time.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            A model pruned by [`~hf_oto.pruning.prune_zero_groups`] (or a dense one of a supported type).
        directory (`str` or `os.PathLike`):
            The folder to write; created if missing.
        tokenizer (*optional*):
            A tokenizer or processor with `save_pretrained`, saved alongside.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty folder. The WHOLE folder is replaced: files that are not part of the saved model
            (e.g. notes you put there) are deleted too.
        safe_serialization (`bool`, *optional*, defaults to `True`):
            Write safetensors (else `pytorch_model.bin`). transformers 5 writes only safetensors: there, `False` logs
            a warning and `model.safetensors` is written ([`load_pruned_model`] reads both formats).
            Saving never exports: for an `onnx/` subfolder call [`~hf_oto.onnx.export_onnx_subfolder`] on the saved
            folder (or `hf-oto export`).
        write_extra (`Callable[[Path], Any]`, *optional*):
            Called with the temporary folder once the model is in it, to add files that belong to the saved folder
            (e.g. a model card) before it replaces `directory`.

    Returns:
        `Path`: the folder.

    Example:

    ```python
    >>> from hf_oto.modeling import load_pruned_model, save_pruned_model

    >>> save_pruned_model(slim_model, "my-pruned-bert", tokenizer)  # doctest: +SKIP
    >>> model = load_pruned_model("my-pruned-bert", AutoModelForSequenceClassification)  # doctest: +SKIP
    ```
    """
    directory = Path(directory)
    check_replaceable(directory, overwrite=overwrite, what="pruned model")
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"save_pruned_model needs a transformers PreTrainedModel; got {type(model).__name__}.")
    model.config.oto_layout = model_layout(model).to_dict()
    save_kwargs = {}
    if _save_pretrained_takes("safe_serialization"):
        save_kwargs["safe_serialization"] = safe_serialization
    elif not safe_serialization:
        logger.warning(
            "safe_serialization=False: this transformers version writes only safetensors, so the pruned model is "
            f"saved as {SAFE_WEIGHTS_NAME} (load_pruned_model reads it, and {WEIGHTS_NAME} folders written with "
            "transformers 4)."
        )
    with atomic_folder(directory, overwrite=overwrite, what="pruned model") as staging:
        model.save_pretrained(staging, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if write_extra is not None:
            write_extra(staging)
    logger.info(f"Saved the pruned model to {directory} (layout {model.config.oto_layout}).")
    return directory


def _save_pretrained_takes(argument: str) -> bool:
    """Whether `PreTrainedModel.save_pretrained` has the named argument (`safe_serialization` is gone in
    transformers 5, which always writes safetensors)."""
    return argument in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _checkpoint_names(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Name in a checkpoint → name in `model`, for the tensors whose names differ.

    transformers 5 renamed the modules of some models (ViT: `encoder.layer.N.attention.attention.query` became
    `layers.N.attention.q_proj`) and still writes checkpoints under the old names (`save_pretrained` reverts its
    weight conversion); `from_pretrained` renames them back when it loads. [`load_pruned_model`] loads the state dict
    itself, so it asks transformers for the same mapping: the names `save_pretrained` would write for each of the
    model's tensors. Empty on transformers 4 (no conversion) and for models whose names did not change.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoints are written under the modules' names
        return {}
    try:
        saved = revert_weight_conversion(model, dict(state_dict))
    except Exception as error:  # a conversion this loader does not handle (e.g. fused weights): names as they are
        logger.warning(
            f"Could not read the checkpoint names of {type(model).__name__} ({error}); using its own names."
        )
        return {}
    by_tensor = {id(tensor): name for name, tensor in state_dict.items()}
    return {
        saved_name: by_tensor[id(tensor)]
        for saved_name, tensor in saved.items()
        if id(tensor) in by_tensor and by_tensor[id(tensor)] != saved_name
    }


def _weight_files(directory: Path) -> list[Path]:
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / shard for shard in shards]
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if (directory / name).is_file():
            return [directory / name]
    raise ValueError(
        f"No weights in {str(directory)!r}: expected {SAFE_WEIGHTS_NAME} (or {WEIGHTS_NAME}, or a sharded index). "
        "Is this the folder written by `save_pruned_model`?"
    )


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state_dict.update(load_file(str(file)))
            else:
                state_dict.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as error:  # safetensors and torch raise their own error types on unreadable files
            raise ValueError(
                f"Cannot read the weights file {str(file)!r} ({type(error).__name__}: {error}): it is truncated or "
                "corrupt. Download it again, or save the model again with `save_pruned_model`."
            ) from error
    return state_dict


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """State-dict names of every tensor that shares its parameter or buffer with other names (tied weights)."""
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        by_tensor.setdefault(id(tensor), set()).add(name)
    return {name: names for names in by_tensor.values() if len(names) > 1 for name in names}


def _is_repo_id(text: str) -> bool:
    """Whether `text` is a valid Hub repo id (`name` or `owner/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _looks_local(text: str) -> bool:
    """Whether `text` names a local path rather than a Hub repo id: absolute, `~`, `./`, `../`, more than
    `owner/name`, a Windows separator, a first part that exists here, or not a valid repo id at all."""
    path = Path(text).expanduser()
    if path.is_absolute() or text.startswith(("~", ".")) or "\\" in text or len(Path(text).parts) > 2:
        return True
    if len(path.parts) == 2 and Path(path.parts[0]).exists():
        return True
    return not _is_repo_id(text)


def _resolve_folder(directory: str | os.PathLike, revision: str | None) -> Path:
    """A local folder as is; a path that looks local but does not exist raises `FileNotFoundError`; a Hub repo id
    (`owner/name`) is downloaded (weights, config, tokenizer)."""
    path = Path(directory).expanduser()
    if path.is_dir():
        return path
    text = str(directory)
    if path.exists():
        raise ValueError(
            f"{text!r} is a file, not a folder: load_pruned_model needs the folder written by `save_pruned_model`."
        )
    if isinstance(directory, os.PathLike) or _looks_local(text):
        raise FileNotFoundError(
            f"The folder {text!r} does not exist (resolved to {str(path.resolve())!r}). Check the path (the folder "
            "written by `save_pruned_model`); to load from the Hub, pass a repo id such as 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    logger.info(f"{text!r} is not a local folder: downloading it from the Hub.")
    return Path(snapshot_download(text, revision=revision, ignore_patterns=["onnx/*", "*.onnx"]))


def load_pruned_model(
    directory: str | os.PathLike, auto_class: type = AutoModel, *, revision: str | None = None, **kwargs: Any
) -> PreTrainedModel:
    """Loads a checkpoint written by [`save_pruned_model`] into a slim model with the same outputs.

    Builds the dense model from `config.json` (`auto_class.from_config`), reshapes it to the recorded `oto_layout`
    with [`~hf_oto.pruning.apply_layout`], loads the weights strictly (tied weights are re-tied) and sets eval mode.

    Args:
        directory (`str` or `os.PathLike`):
            The folder written by [`save_pruned_model`], or the id (`owner/name`) of a Hub repository holding one. A
            path that looks local (absolute, `./`, `../`, `~`, more than `owner/name`, a first part that exists here,
            a `Path`) and does not exist raises `FileNotFoundError` instead of going to the Hub.
        auto_class (`type`, *optional*, defaults to `AutoModel`):
            An `AutoModel*` class (e.g. `AutoModelForQuestionAnswering`) or a concrete model class
            (e.g. `BertForQuestionAnswering`).
        revision (`str`, *optional*):
            Branch, tag or commit of a Hub repository.
        kwargs:
            Passed on to `from_config` (e.g. `attn_implementation="eager"`).

    Returns:
        [`~transformers.PreTrainedModel`]: the pruned model, in eval mode.

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification
    >>> from hf_oto.modeling import load_pruned_model

    >>> model = load_pruned_model("my-pruned-bert", AutoModelForSequenceClassification)  # doctest: +SKIP
    ```
    """
    directory = _resolve_folder(directory, revision)
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"No config.json in {str(directory)!r}: load_pruned_model needs a folder written by `save_pruned_model`."
        )
    files = _weight_files(directory)
    config = AutoConfig.from_pretrained(directory)
    layout = getattr(config, "oto_layout", None)
    if layout is None:
        raise ValueError(
            f"The config in {str(directory)!r} has no `oto_layout`: this is a dense checkpoint, not one written by "
            f"`save_pruned_model`. Load it with `{getattr(auto_class, '__name__', 'AutoModel')}.from_pretrained`."
        )
    if hasattr(auto_class, "from_config"):
        model = auto_class.from_config(config, **kwargs)
    elif hasattr(auto_class, "_from_config"):
        model = auto_class._from_config(config, **kwargs)
    else:
        raise ValueError(f"auto_class must be an AutoModel* class or a transformers model class; got {auto_class!r}.")
    apply_layout(model, layout)

    state_dict = _read_state_dict(files)
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and not any(name.startswith(prefix) for name in expected):
        if any(name.startswith(prefix) for name in state_dict):
            # A base model from a task checkpoint: keep the base model's tensors, drop the task head.
            dropped = [name for name in state_dict if not name.startswith(prefix)]
            state_dict = {name[len(prefix) :]: t for name, t in state_dict.items() if name.startswith(prefix)}
            logger.info(f"Loading the base model only; dropped the task head tensors {dropped}.")
    elif prefix != "." and not any(name.startswith(prefix) for name in state_dict):
        # A base-model checkpoint into a task model: its tensors belong under the base model prefix.
        state_dict = {prefix + name: tensor for name, tensor in state_dict.items()}
    renames = _checkpoint_names(model, expected)
    state_dict = {renames.get(name, name) if name not in expected else name: t for name, t in state_dict.items()}
    for name, reference in expected.items():
        tensor = state_dict.get(name)
        if tensor is not None and reference.shape != tensor.shape:
            raise ValueError(
                f"The weights in {str(directory)!r} do not match the recorded oto_layout: {name!r} has shape "
                f"{tuple(tensor.shape)} in the checkpoint, but the layout expects {tuple(reference.shape)}. The "
                "config.json and the weights come from different models; save the pruned model again with "
                "`save_pruned_model`."
            )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ValueError(
            f"The weights in {str(directory)!r} hold tensors that {type(model).__name__} lacks, e.g. {unexpected[:3]}. "
            "Pass the `auto_class` the model was saved with (e.g. `AutoModelForQuestionAnswering`)."
        )
    aliases = _aliases(model)
    missing = [
        name
        for name in sorted(set(expected) - set(state_dict))
        if not any(alias in state_dict for alias in aliases.get(name, ()))
    ]
    if missing:
        raise ValueError(
            f"The weights in {str(directory)!r} lack {len(missing)} tensors of {type(model).__name__}, e.g. "
            f"{missing[:3]}. Pass the `auto_class` the model was saved with."
        )
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    model.eval()
    return model


def load_model_folder(directory: str | os.PathLike) -> PreTrainedModel:
    """A PyTorch model from a saved folder, in eval mode: a slim model (`oto_layout` in its config) through
    [`load_pruned_model`], a dense one through `from_pretrained`; the class is the config's `architectures[0]` (a
    transformers class or one of hf_oto's own), else `AutoModel`.

    Example:

    ```python
    >>> from hf_oto.modeling import load_model_folder

    >>> model = load_model_folder("my-pruned-bert")  # doctest: +SKIP
    ```
    """
    import transformers

    from . import models as hf_oto_models

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{str(directory)!r} has no config.json: a model folder (written by `save_pretrained` or "
            "`hf_oto.modeling.save_pruned_model`) is needed, or pass a model object."
        )
    config = AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    model_class = None
    if architectures:  # a transformers class, or one of hf_oto's own (the CIFAR conv nets)
        model_class = getattr(transformers, architectures[0], None) or getattr(hf_oto_models, architectures[0], None)
    model_class = model_class or AutoModel
    if getattr(config, "oto_layout", None) is not None:
        return load_pruned_model(directory, model_class)
    try:
        return model_class.from_pretrained(directory).eval()
    except OSError as error:
        raise ValueError(f"{str(directory)!r} has a config.json but no weights that transformers can load.") from error
