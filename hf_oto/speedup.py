"""ONNX Runtime latency of a dense model against its slim version: [`benchmark_speedup`] and its result types.

This module joins the two sides that do not know each other: loading saved folders
([`~hf_oto.modeling.load_model_folder`]) and exporting models ([`~hf_oto.onnx.export_onnx`]). Both models run with
ONNX Runtime on the same inputs, interleaved, and the result is reported next to their parameter and FLOPs counts as
a [`SpeedupResult`].
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging

from .flops import count_flops, count_parameters
from .modeling import load_model_folder
from .onnx import ONNX_FILE_NAME, ONNX_SUBFOLDER, _dummy_feed, _require_optimum, _session, export_onnx


logger = logging.get_logger(__name__)


@dataclass
class LatencyStats:
    """Summary of one model's latencies, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    mean_ms: float
    min_ms: float
    samples: int

    @classmethod
    def from_seconds(cls, times: list[float]) -> LatencyStats:
        ms = sorted(t * 1e3 for t in times)
        quantiles = statistics.quantiles(ms, n=20, method="inclusive") if len(ms) > 1 else [ms[0]] * 19
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        return cls(
            median_ms=statistics.median(ms),
            p10_ms=quantiles[1],
            p90_ms=quantiles[17],
            iqr_ms=q3 - q1,
            mean_ms=statistics.fmean(ms),
            min_ms=ms[0],
            samples=len(ms),
        )


@dataclass
class SpeedupResult:
    """ONNX Runtime latency of a dense model and its slim version, with their sizes ([`benchmark_speedup`]).

    `speedup` is median dense latency / median slim latency, `flops_ratio` is dense FLOPs / slim FLOPs (both > 1 when
    the slim model is faster / cheaper, so they compare directly) and `efficiency` is `speedup / flops_ratio`.
    `paired_speedup` is the median of the per-round ratios (each round runs both models back to back), which is
    robust to drift of the machine's speed.
    """

    batch_size: int
    seq_length: int
    num_threads: int | None
    warmup: int
    repeats: int
    dense: LatencyStats
    slim: LatencyStats
    dense_params: int
    slim_params: int
    dense_flops: int
    slim_flops: int
    paired_speedup: float
    allow_spinning: bool = False
    dense_name: str = "dense"
    slim_name: str = "slim"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Median dense latency / median slim latency."""
        return self.dense.median_ms / self.slim.median_ms

    @property
    def flops_ratio(self) -> float:
        """Dense FLOPs / slim FLOPs (the speedup that FLOPs alone would predict)."""
        return self.dense_flops / self.slim_flops if self.slim_flops else math.inf

    @property
    def params_ratio(self) -> float:
        """Slim parameters / dense parameters (the share kept)."""
        return self.slim_params / self.dense_params if self.dense_params else 1.0

    @property
    def efficiency(self) -> float:
        """`speedup / flops_ratio`: 1.0 when the latency falls exactly as much as the FLOPs."""
        return self.speedup / self.flops_ratio

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields and derived ratios."""
        result = asdict(self)
        result.update(
            speedup=self.speedup,
            flops_ratio=self.flops_ratio,
            params_ratio=self.params_ratio,
            efficiency=self.efficiency,
        )
        return result

    def __str__(self) -> str:
        threads = self.num_threads if self.num_threads is not None else "ORT default"
        spinning = "on" if self.allow_spinning else "off"
        lines = [
            f"ONNX Runtime, batch {self.batch_size}, seq {self.seq_length}, threads {threads} (spinning {spinning}), "
            f"{self.repeats} interleaved rounds after {self.warmup} warm-up rounds",
            "",
            "| model | params | GFLOPs | median ms | p10-p90 ms | IQR ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, stats, params, flops in (
            (self.dense_name, self.dense, self.dense_params, self.dense_flops),
            (self.slim_name, self.slim, self.slim_params, self.slim_flops),
        ):
            lines.append(
                f"| {name} | {params:,} | {flops / 1e9:.3f} | {stats.median_ms:.2f} | "
                f"{stats.p10_ms:.2f}-{stats.p90_ms:.2f} | {stats.iqr_ms:.2f} |"
            )
        lines += [
            "",
            f"speedup {self.speedup:.2f}x (paired {self.paired_speedup:.2f}x), FLOPs ratio {self.flops_ratio:.2f}x, "
            f"speedup / FLOPs ratio {self.efficiency:.2f}, params kept {self.params_ratio:.1%}",
        ]
        return "\n".join(lines)


def _prepare(
    model_or_dir: nn.Module | str | os.PathLike,
    workdir: Path,
    name: str,
    task: str | None,
    onnx_dir: str | os.PathLike | None = None,
    optimize: str | None = None,
):
    """(torch model, path of model.onnx) for a model object or a saved folder; exports into `workdir` if needed."""
    if onnx_dir is not None:
        onnx_path = Path(onnx_dir) / ONNX_FILE_NAME
        if not onnx_path.is_file():
            raise ValueError(
                f"No {ONNX_FILE_NAME} in {str(onnx_dir)!r} (the `{name}_onnx` folder); pass a folder written by "
                "`export_onnx`, or leave it unset to export the model."
            )
        model = load_model_folder(Path(model_or_dir)) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
        return model, onnx_path
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        if not directory.is_dir():
            raise ValueError(f"{str(directory)!r} is not a folder; pass a model folder or a model object.")
        model = load_model_folder(directory)
        for candidate in (directory / ONNX_SUBFOLDER, directory):
            if (candidate / ONNX_FILE_NAME).is_file():
                return model, candidate / ONNX_FILE_NAME
    elif isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        raise ValueError(
            f"benchmark_speedup takes model objects or folders; got {type(model_or_dir).__name__} for the {name} model."
        )
    extra = {"optimize": optimize} if optimize is not None else {}
    out = export_onnx(model, workdir / name, task=task, validate=False, **extra)
    return model, out / ONNX_FILE_NAME


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive integer; got {value!r}.")


def benchmark_speedup(
    dense: nn.Module | str | os.PathLike,
    slim: nn.Module | str | os.PathLike,
    *,
    batch_size: int = 1,
    seq_length: int = 128,
    num_threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    task: str | None = None,
    seed: int = 0,
    progress: bool = True,
    dense_onnx: str | os.PathLike | None = None,
    slim_onnx: str | os.PathLike | None = None,
    optimize: str | None = None,
    allow_spinning: bool = False,
) -> SpeedupResult:
    """Measures the ONNX Runtime latency of a dense model and its slim version on the same inputs, interleaved.

    Both models are exported with [`export_onnx`] into a temporary folder (a folder argument with an `onnx/` subfolder
    or a `model.onnx` is used as it is), loaded into CPU ONNX Runtime sessions with all graph optimizations, and run
    alternately on the same random token batch: each round runs both models back to back, in alternating order, so
    drift of the machine's speed (other processes, thermal throttling) hits both and cancels in the ratio. Parameters
    and FLOPs are counted on the PyTorch models ([`~hf_oto.flops.count_flops`] at the same batch and length).

    Args:
        dense (`nn.Module`, `str` or `os.PathLike`):
            The dense model, or its folder (`save_pretrained` layout).
        slim (`nn.Module`, `str` or `os.PathLike`):
            The slim model, or its folder (written by [`~hf_oto.modeling.save_pruned_model`]).
        batch_size (`int`, *optional*, defaults to 1):
            Batch size of the inputs.
        seq_length (`int`, *optional*, defaults to 128):
            Sequence length of the inputs.
        num_threads (`int`, *optional*):
            ONNX Runtime intra-op threads; ONNX Runtime's default (all cores) when `None`.
        warmup (`int`, *optional*, defaults to 5):
            Untimed rounds before measuring (0 allowed).
        repeats (`int`, *optional*, defaults to 30):
            Timed rounds; each runs both models once.
        task (`str`, *optional*):
            Export task for models that need exporting; inferred when `None`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the random token ids.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar.
        dense_onnx (`str` or `os.PathLike`, *optional*):
            A folder with an existing [`export_onnx`] export of `dense` to time instead of exporting it again
            (useful when one dense model is compared with several slim ones).
        slim_onnx (`str` or `os.PathLike`, *optional*):
            The same for `slim`.
        optimize (`str`, *optional*):
            Optimum's ONNX Runtime optimization level (`"O1"` to `"O3"`) for the models this function exports, e.g.
            `"O2"` for fused attention and GELU kernels. Fused attention handles per-layer head counts: ONNX Runtime
            reads each layer's heads from its weights when they disagree with the config.
        allow_spinning (`bool`, *optional*, defaults to `False`):
            Let ONNX Runtime's intra-op threads spin between operators (its own default is `True`). Spinning threads
            compete for the cores with everything else on the machine and each operator waits for the slowest
            thread, a fixed cost per operator that penalises the slim model (the same operators, each cheaper): on a
            shared 2-core machine it cut the measured speedup of a 67%-pruned BERT-base from ~3.2x to ~2.3x. Turn it
            on to measure ORT's default configuration on a dedicated machine.

    Returns:
        [`SpeedupResult`]: latencies, speedup, parameters and FLOPs of both models; `str()` gives a markdown table and
        `to_dict()` a JSON-ready dict.

    Example:

    ```python
    >>> from hf_oto.speedup import benchmark_speedup

    >>> result = benchmark_speedup(dense_model, slim_model, batch_size=1, seq_length=128, repeats=20)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    >>> result.speedup, result.flops_ratio  # doctest: +SKIP
    ```
    """
    _check_positive(batch_size=batch_size, seq_length=seq_length, repeats=repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer; got {warmup!r}.")
    if num_threads is not None:
        _check_positive(num_threads=num_threads)
    _require_optimum()
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(prefix="hf_oto_onnx_") as tmp:
        workdir = Path(tmp)
        dense_model, dense_path = _prepare(dense, workdir, "dense", task, dense_onnx, optimize)
        slim_model, slim_path = _prepare(slim, workdir, "slim", task, slim_onnx, optimize)
        max_positions = getattr(dense_model.config, "max_position_embeddings", None)
        if max_positions is not None and seq_length > max_positions:
            raise ValueError(
                f"seq_length={seq_length} exceeds the model's max_position_embeddings={max_positions}; pass a "
                "shorter seq_length."
            )
        sessions = {
            key: _session(path, num_threads, allow_spinning)
            for key, path in (("dense", dense_path), ("slim", slim_path))
        }
        # A slim graph may lack inputs that no kept operator reads (e.g. `attention_mask` when no layer keeps heads),
        # so each session gets its own inputs out of one shared batch.
        input_names = {key: [i.name for i in s.get_inputs()] for key, s in sessions.items()}
        all_names = sorted({*input_names["dense"], *input_names["slim"]})
        batch = _dummy_feed(all_names, dense_model.config, batch_size, seq_length, seed=seed, pad=False)
        feeds = {key: {name: batch[name] for name in names} for key, names in input_names.items()}
        times: dict[str, list[float]] = {"dense": [], "slim": []}
        shape = f"s{seq_length}" if "input_ids" in all_names else "image"  # image models have no sequence length
        rounds = tqdm(
            range(warmup + repeats), desc=f"ORT latency b{batch_size} {shape}", disable=not progress, leave=False
        )
        for round_index in rounds:
            order = ("dense", "slim") if round_index % 2 == 0 else ("slim", "dense")
            for key in order:
                start = time.perf_counter()
                sessions[key].run(None, feeds[key])
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    times[key].append(elapsed)
        del sessions
    pair_ratios = [d / s for d, s in zip(times["dense"], times["slim"])]
    result = SpeedupResult(
        batch_size=batch_size,
        seq_length=seq_length,
        num_threads=num_threads,
        warmup=warmup,
        repeats=repeats,
        dense=LatencyStats.from_seconds(times["dense"]),
        slim=LatencyStats.from_seconds(times["slim"]),
        dense_params=count_parameters(dense_model),
        slim_params=count_parameters(slim_model),
        dense_flops=count_flops(dense_model, seq_length=seq_length, batch_size=batch_size),
        slim_flops=count_flops(slim_model, seq_length=seq_length, batch_size=batch_size),
        paired_speedup=statistics.median(pair_ratios),
        allow_spinning=allow_spinning,
    )
    logger.info(f"\n{result}")
    return result
