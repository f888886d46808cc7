"""What a training job leaves behind once the model is pruned: the slim folder (with its card), an optional ONNX
export with its measured speedup, and `all_results.json`. Shared by the scripts in `scripts/`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import HfArgumentParser
from transformers.utils import logging


logger = logging.get_logger(__name__)


@dataclass
class OTORunOutputArguments:
    """The output arguments the training scripts share (their data-argument dataclasses inherit them)."""

    flops_seq_length: int | None = field(
        default=None, metadata={"help": "Sequence length at which FLOPs are reported (default: max_seq_length)."}
    )
    export_onnx: bool = field(
        default=False, metadata={"help": "Export the slim model to <pruned folder>/onnx (needs optimum[onnxruntime])."}
    )
    benchmark_speedup: bool = field(
        default=False,
        metadata={
            "help": "Measure the ONNX Runtime speedup of the slim model over the full-size one (implies export)."
        },
    )
    benchmark_batch_size: int = field(default=1, metadata={"help": "Batch size of the speedup benchmark."})
    benchmark_repeats: int = field(default=30, metadata={"help": "Timed rounds of the speedup benchmark."})
    pruned_model_dir: str | None = field(
        default=None, metadata={"help": "Where the slim model goes (default: <output_dir>/pruned)."}
    )
    license: str | None = field(
        default=None, metadata={"help": "License of the slim model, for its card's metadata (e.g. apache-2.0)."}
    )


def pruning_results(report: Any) -> dict[str, Any]:
    """The size figures of a [`~hf_oto.report.PruningReport`] for `all_results.json`: `dense_params`, `dense_flops`,
    `params`, `flops` and their ratios, plus the kept channels (`architecture`, `channels_before/after`) when the
    model has channel families.

    Example:

    ```python
    >>> pruning_results(trainer.pruning_report)["flops_ratio"]  # doctest: +SKIP
    0.5
    ```
    """
    results = {
        "dense_params": report.params_before,
        "dense_flops": report.flops_before,
        "params": report.params_after,
        "flops": report.flops_after,
        "params_ratio": report.params_ratio,
        "flops_ratio": report.flops_ratio,
    }
    if report.channels_before is not None:
        results.update(
            architecture=report.architecture(),
            channels_before=report.channels_before,
            channels_after=report.channels_after,
        )
    return results


def finish_oto_run(
    trainer,
    results: dict[str, Any],
    output_args: OTORunOutputArguments,
    *,
    pruned_dir: str,
    do_eval: bool = True,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    result_metric_keys: Sequence[str] | None = None,
    extra_steps: Callable[[Any, dict[str, Any]], None] | None = None,
    check_inputs: Mapping[str, Any] | None = None,
    seq_length: int | None = None,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    sparsity_by_family: bool = True,
    card_kwargs: Mapping[str, Any] | None = None,
    push_to_hub: bool = False,
) -> dict[str, Any]:
    """The one finishing step of an OTO run with a [`~hf_oto.OTOTrainer`], after `trainer.train()`: prune → check →
    measure → evaluate → save (weights, layout, processor, card with the evaluation metrics) → optional ONNX export
    and speedup → `all_results.json` → optional push. The training scripts keep only what is specific to their task
    (which dataset to evaluate on, QA post-processing inside their trainer's `evaluate`, a predict step).

    Args:
        trainer ([`~hf_oto.OTOTrainer`]): The trained trainer (not yet pruned).
        results (`dict`): The run's figures so far (e.g. the train metrics); completed and returned.
        output_args ([`OTORunOutputArguments`]): `export_onnx`, `benchmark_speedup` and the benchmark settings.
        pruned_dir (`str`): Where the slim model and its card go.
        do_eval (`bool`, *optional*, defaults to `True`): Evaluate the slim model.
        evaluate (`Callable`, *optional*): `evaluate(trainer) -> metrics`; defaults to `trainer.evaluate()`. The
            metrics are logged and saved with the Trainer's `log_metrics`/`save_metrics` (`eval_results.json`) and
            reach the card through the Trainer's log.
        result_metric_keys (`Sequence[str]`, *optional*): Which metrics go into `all_results.json` (default: all).
        extra_steps (`Callable`, *optional*): `extra_steps(trainer, results)`, run on the slim model after the
            evaluation and before saving (e.g. a predict step).
        check_inputs (`Mapping`, *optional*): The batch the slim model's outputs are checked on (default: the first
            eval, else train, batch; see [`~hf_oto.OTOTrainer.prune`]).
        seq_length (`int`, *optional*): Token length at which FLOPs are counted (and the speedup measured); default
            128, clamped to the model's `max_position_embeddings`.
        tokenizer (*optional*): Saved into the ONNX export too.
        overwrite (`bool`): Whether a non-empty slim folder may be replaced.
        sparsity_by_family (`bool`): Record the sparsity of every family in `all_results.json`.
        card_kwargs (`Mapping`, *optional*): More model-card arguments (see [`card_metadata`]).
        push_to_hub (`bool`): Upload the slim folder once at the end ([`~hf_oto.OTOTrainer.push_to_hub`]).

    Returns:
        `dict`: `results`, completed (also in `<output_dir>/all_results.json`).

    Raises:
        [`OnnxExportError`] when the export or the benchmark failed, after saving everything else (no push then).

    Example:

    ```python
    >>> trainer.train()
    >>> results = finish_oto_run(trainer, {}, OTORunOutputArguments(export_onnx=True), pruned_dir="out/pruned")
    ```
    """
    import copy

    results.update(sparsity_results(trainer.zigs, by_family=sparsity_by_family))
    # The full-size group-sparse model, kept only to measure the slim model's speedup against it.
    dense_reference = copy.deepcopy(trainer.model).eval() if output_args.benchmark_speedup else None
    trainer.prune(inputs=check_inputs, seq_length=seq_length)
    report = trainer.pruning_report
    results.update(pruning_results(report))
    logger.info(f"Pruned model:\n{report}")
    if do_eval:  # the SLIM model (trainer.model after prune), through the Trainer's evaluation and log
        metrics = dict(evaluate(trainer) if evaluate is not None else trainer.evaluate())
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        keys = result_metric_keys if result_metric_keys is not None else list(metrics)
        results.update({key: metrics[key] for key in keys if key in metrics})
    if extra_steps is not None:
        extra_steps(trainer, results)
    write_run_outputs(
        trainer,
        results,
        pruned_dir=pruned_dir,
        overwrite=overwrite,
        tokenizer=tokenizer,
        export_onnx=output_args.export_onnx,
        dense_reference=dense_reference,
        benchmark_batch_size=output_args.benchmark_batch_size,
        benchmark_repeats=output_args.benchmark_repeats,
        seq_length=report.seq_length,
        card_kwargs=card_kwargs,
    )
    if push_to_hub:  # the slim folder, once
        trainer.push_to_hub()
    return results


def write_run_outputs(
    trainer,
    results: dict[str, Any],
    *,
    pruned_dir: str,
    overwrite: bool = False,
    tokenizer: Any | None = None,
    export_onnx: bool = False,
    dense_reference: nn.Module | None = None,
    benchmark_batch_size: int = 1,
    benchmark_repeats: int = 30,
    seq_length: int = 128,
    card_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Saves the pruned model of `trainer` and writes `all_results.json` into `trainer.args.output_dir`.

    The card gets the final evaluation metrics of `results` (its `eval_*` figures, e.g. the EM/F1 a script computed
    itself) and `card_kwargs` (see [`card_metadata`]).

    Args:
        trainer ([`OTOTrainer`]): A trainer whose model was pruned with `trainer.prune()`.
        results (`dict`): The run's figures so far; the folder, ONNX and speedup figures are added to it.
        pruned_dir (`str`): Where the slim model and its card go.
        overwrite (`bool`): Whether the slim folder may be written into when it is not empty.
        tokenizer (*optional*): Saved into the ONNX export too.
        export_onnx (`bool`): Export the slim model to `<pruned_dir>/onnx` (needs `optimum[onnxruntime]`).
        dense_reference (`nn.Module`, *optional*): The full-size group-sparse model; when given, the ONNX Runtime
            speedup of the slim model over it is measured (this implies the export) and added to the card.
        benchmark_batch_size, benchmark_repeats, seq_length: Settings of the speedup benchmark.
        card_kwargs (`Mapping`, *optional*): More arguments of [`hf_oto.model_card.create_model_card`].

    Returns:
        `dict`: `results`, completed.

    Example:

    ```python
    >>> slim = trainer.prune()
    >>> write_run_outputs(trainer, {"eval_f1": 88.0}, pruned_dir="out/pruned", export_onnx=True)  # doctest: +SKIP
    ```
    """
    metrics = eval_metrics(results)
    trainer.oto_card_kwargs.update({**({"metrics": metrics} if metrics else {}), **(card_kwargs or {})})
    trainer.save_pruned_model(pruned_dir, overwrite=overwrite)
    return finish_run_outputs(
        trainer.model,
        results,
        pruned_dir=pruned_dir,
        output_dir=trainer.args.output_dir,
        write_card=trainer.write_oto_model_card,
        is_main_process=trainer.is_world_process_zero(),
        tokenizer=tokenizer,
        export_onnx=export_onnx,
        dense_reference=dense_reference,
        benchmark_batch_size=benchmark_batch_size,
        benchmark_repeats=benchmark_repeats,
        seq_length=seq_length,
    )


def finish_run_outputs(
    slim: nn.Module,
    results: dict[str, Any],
    *,
    pruned_dir: str,
    output_dir: str,
    write_card: Callable[..., Any],
    is_main_process: bool = True,
    tokenizer: Any | None = None,
    export_onnx: bool = False,
    dense_reference: nn.Module | None = None,
    benchmark_batch_size: int = 1,
    benchmark_repeats: int = 30,
    seq_length: int = 128,
) -> dict[str, Any]:
    """What follows saving the slim model into `pruned_dir`, with or without a `Trainer`: the optional ONNX export
    and speedup (the card is then rewritten through `write_card(pruned_dir, speedup=..., has_onnx=True)`), and
    `all_results.json` in `output_dir` (written by the main process).

    A failed export or benchmark never loses the run: `all_results.json` is written before the export starts and
    again after it, with the error under `onnx_export_error` (or `onnx_benchmark_error`, the export being kept), and
    the slim folder stays as saved (the export is atomic, so no half `onnx/` subfolder is left). The failure is then
    raised as an [`OnnxExportError`] whose message says where the model and results are and how to
    export again; the scripts exit with status 1 and that message (a run asked for an export it did not get), before
    `--push_to_hub`.

    Raises:
        [`OnnxExportError`] when the export or the benchmark failed, after writing everything else.

    Example:

    ```python
    >>> finish_run_outputs(slim, results, pruned_dir="out/pruned", output_dir="out", write_card=my_card_writer)
    ```
    """
    results["pruned_model_dir"] = relative_path(pruned_dir, output_dir)
    if export_onnx or dense_reference is not None:
        if is_main_process:  # first: whatever happens in the export, the run's figures are on disk
            write_all_results(results, output_dir)
        try:
            onnx_results, card_speedup = onnx_workflow(
                slim,
                pruned_dir,
                dense=dense_reference,
                tokenizer=tokenizer,
                batch_size=benchmark_batch_size,
                seq_length=seq_length,
                repeats=benchmark_repeats,
            )
        except OnnxExportError as error:
            raise _record_onnx_failure(error, results, pruned_dir, output_dir, write_card, is_main_process) from (
                error.__cause__ or error
            )
        results.update(onnx_results)
        if results.get("onnx_dir"):
            results["onnx_dir"] = relative_path(results["onnx_dir"], output_dir)
        if is_main_process:
            write_card(pruned_dir, speedup=card_speedup, has_onnx=True)
    if is_main_process:
        write_all_results(results, output_dir)
        logger.info(f"Results: {json.dumps(results, indent=2, sort_keys=True)}")
    return results


def _record_onnx_failure(
    error: Exception,
    results: dict[str, Any],
    pruned_dir: str,
    output_dir: str,
    write_card: Callable[..., Any],
    is_main_process: bool,
) -> Exception:
    """Records a failed ONNX step in `results` and `all_results.json`; returns the error to raise."""
    stage = getattr(error, "stage", "export")
    results.update(getattr(error, "results", {}))
    if results.get("onnx_dir"):  # the export succeeded, the benchmark failed
        results["onnx_dir"] = relative_path(results["onnx_dir"], output_dir)
    cause = error.__cause__ or error
    results[f"onnx_{stage}_error"] = f"{type(cause).__name__}: {cause}"
    results_file = Path(output_dir) / "all_results.json"
    if stage == "export":
        retry = (
            f"export it again with `hf-oto export {pruned_dir} {Path(pruned_dir) / 'onnx'}` once the cause is fixed"
        )
    else:
        retry = f"measure it again with `hf-oto benchmark <dense folder> {pruned_dir}`"
    message = (
        f"{error}. The training results are kept: the slim model is saved in {pruned_dir} and the figures in "
        f"{results_file} (with `onnx_{stage}_error`); {retry}."
    )
    if is_main_process:
        if results.get("onnx_dir"):
            write_card(pruned_dir, speedup=None, has_onnx=True)
        write_all_results(results, output_dir)
        logger.error(message, exc_info=cause)
    return OnnxExportError(message, stage=stage, results=results)


def write_all_results(results: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    """Writes `results` to `<output_dir>/all_results.json` (sorted keys, indented); returns the file.

    Example:

    ```python
    >>> write_all_results({"eval_accuracy": 0.91}, "out")  # doctest: +SKIP
    PosixPath('out/all_results.json')
    ```
    """
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    target, partial = path / "all_results.json", path / "all_results.json.tmp"
    with open(partial, "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
    os.replace(partial, target)  # a write killed half-way leaves the previous file, not half of the new one
    return target


def relative_path(path: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """`path` relative to `output_dir`, as `all_results.json` records folders (no absolute local paths).

    Example:

    ```python
    >>> relative_path("/runs/out/pruned", "/runs/out")
    'pruned'
    ```
    """
    return os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))


def eval_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The numeric `eval_*` figures of `results` (without runtimes and throughputs), for the model card."""
    return {
        key: float(value)
        for key, value in results.items()
        if key.startswith("eval_")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not key.endswith(("_runtime", "_per_second"))
    }


def card_metadata(
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    license: str | None = None,
    eval_split: str = "validation",
) -> dict[str, Any]:
    """Model-card arguments of a script's run: the Hub dataset (for `datasets` and the `model-index`), the license.

    Example:

    ```python
    >>> card_metadata(dataset_name="glue", dataset_config="sst2", license="apache-2.0")["eval_dataset_name"]
    'glue sst2'
    ```
    """
    kwargs: dict[str, Any] = {"license": license, "eval_dataset_split": eval_split}
    if dataset_name is not None:
        kwargs["datasets"] = [dataset_name]
        kwargs["eval_dataset_name"] = " ".join(part for part in (dataset_name, dataset_config) if part)
        kwargs["eval_dataset_config"] = dataset_config
    return {key: value for key, value in kwargs.items() if value is not None}


def parse_script_arguments(dataclass_types: Sequence[type], argv: list[str] | None = None) -> tuple:
    """Parses a script's argument dataclasses from the command line (`argv`, default `sys.argv[1:]`), or from a
    single JSON file when `argv` is one path ending in `.json`, as the transformers example scripts do.

    Example:

    ```python
    >>> from hf_oto import OTOTrainingArguments
    >>> from hf_oto.run_outputs import parse_script_arguments

    >>> (args,) = parse_script_arguments([OTOTrainingArguments], ["--output_dir", "out", "--oto_target_flops", "0.4"])
    >>> args.oto_target_flops
    0.4
    ```
    """
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def sparsity_results(zigs, *, by_family: bool = True) -> dict[str, Any]:
    """The group-sparsity figures the scripts write to `all_results.json`: overall, per kind, per family (unless
    `by_family=False`), and the zero and total group counts.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hf_oto import build_zigs
    >>> from hf_oto.run_outputs import sparsity_results

    >>> zigs = build_zigs(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)))
    >>> sparsity_results(zigs)["zero_groups"]
    0
    ```
    """
    return {
        "group_sparsity": zigs.group_sparsity(),
        **{f"group_sparsity_{kind}": value for kind, value in zigs.sparsity_by_kind().items()},
        **({"group_sparsity_by_family": zigs.sparsity_by_family()} if by_family else {}),
        "zero_groups": zigs.num_zero_groups(),
        "num_groups": len(zigs),
    }


# ----------------------------------------------------------------------------------------------------------------
# ONNX export and speedup after saving
# ----------------------------------------------------------------------------------------------------------------
class OnnxExportError(RuntimeError):
    """A step of [`onnx_workflow`] (the `--export_onnx` / `--benchmark_speedup` tail of a training script) failed.

    Args:
        message (`str`): What failed, and how to redo it.
        stage (`str`): `"export"` or `"benchmark"`.
        results (`dict`, *optional*): The figures of the steps that succeeded (e.g. `onnx_dir` when only the benchmark
            failed).

    Example:

    ```python
    >>> from hf_oto.run_outputs import OnnxExportError

    >>> try:
    ...     onnx_workflow(slim, "out/pruned")  # doctest: +SKIP
    ... except OnnxExportError as error:
    ...     print(error.stage, error)
    ```
    """

    def __init__(self, message: str, *, stage: str, results: dict[str, Any] | None = None):
        super().__init__(message)
        self.stage = stage
        self.results = dict(results or {})


def onnx_workflow(
    slim: nn.Module,
    pruned_dir: str | os.PathLike,
    *,
    dense: nn.Module | None = None,
    tokenizer: Any | None = None,
    export: bool = True,
    batch_size: int = 1,
    seq_length: int = 128,
    repeats: int = 30,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What the `--export_onnx` / `--benchmark_speedup` flags of the training scripts do after saving the slim model.

    Exports `slim` to `pruned_dir/onnx` (when `export`), and, when `dense` (the full-size group-sparse model, kept
    before pruning) is given, measures the ONNX Runtime speedup of the slim model over it with
    [`~hf_oto.speedup.benchmark_speedup`].

    Returns:
        `tuple[dict, dict | None]`: flat figures for `all_results.json` (`onnx_dir`, `onnx_speedup`,
        `onnx_latency_dense_ms`, ...), and the speedup summary for the model card (`None` without a benchmark).

    Raises:
        [`OnnxExportError`] when the export or the benchmark fails (the original error is its `__cause__`); the export
        is atomic, so a failed export leaves no `onnx/` subfolder behind.

    Example:

    ```python
    >>> results, card_speedup = onnx_workflow(slim, "out/pruned", dense=dense_copy, tokenizer=tokenizer)  # doctest: +SKIP
    >>> results["onnx_speedup"]  # doctest: +SKIP
    1.83
    ```
    """
    results: dict[str, Any] = {}
    onnx_dir = None
    if export:
        try:
            from .onnx import export_onnx_subfolder  # optimum is an optional dependency

            onnx_dir = export_onnx_subfolder(slim, pruned_dir, tokenizer)
        except Exception as error:
            raise OnnxExportError(
                f"The ONNX export of the slim {type(slim).__name__} to {Path(pruned_dir) / 'onnx'} failed "
                f"({type(error).__name__}: {error})",
                stage="export",
            ) from error
        results["onnx_dir"] = str(onnx_dir)
    if dense is None:
        return results, None
    try:
        from . import speedup

        measured = speedup.benchmark_speedup(
            dense, slim, batch_size=batch_size, seq_length=seq_length, repeats=repeats, slim_onnx=onnx_dir
        )
    except Exception as error:
        raise OnnxExportError(
            f"The ONNX Runtime speedup benchmark of the slim {type(slim).__name__} failed ({type(error).__name__}: "
            f"{error})",
            stage="benchmark",
            results=results,
        ) from error
    results.update(
        onnx_speedup=measured.speedup,
        onnx_latency_dense_ms=measured.dense.median_ms,
        onnx_latency_slim_ms=measured.slim.median_ms,
        onnx_flops_ratio=measured.flops_ratio,
        onnx_benchmark_batch_size=batch_size,
    )
    if getattr(slim, "main_input_name", None) == "pixel_values":
        from .flops import image_size

        height, width = image_size(slim.config)
        results["onnx_benchmark_image_size"] = [height, width]
        shape = ("batch size x image size", f"{batch_size} x {height} x {width}")
    else:
        results["onnx_benchmark_seq_length"] = seq_length
        shape = ("batch size x sequence length", f"{batch_size} x {seq_length}")
    card = {
        "ONNX Runtime speedup (median latency, dense / slim)": f"{measured.speedup:.2f}x",
        "dense latency (median)": f"{measured.dense.median_ms:.2f} ms",
        "slim latency (median)": f"{measured.slim.median_ms:.2f} ms",
        "FLOPs ratio (dense / slim)": f"{measured.flops_ratio:.2f}x",
        shape[0]: shape[1],
        "threads": str(measured.num_threads if measured.num_threads is not None else "ORT default"),
        "timed rounds": str(repeats),
    }
    return results, card
