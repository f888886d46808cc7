"""The `hf-oto` command line.

Usage:

```bash
# ONNX Runtime latency of a dense folder vs a pruned folder (written by hf_oto.modeling.save_pruned_model)
hf-oto benchmark path/to/dense path/to/slim --batch_size 1 --seq_length 128 --threads 2 --repeats 30 --json out.json

# ONNX export of a saved (pruned or dense) model, loadable with optimum.onnxruntime.ORTModelFor*
hf-oto export path/to/slim path/to/slim/onnx --task text-classification
```
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-oto` (sub-commands `benchmark` and `export`)."""
    parser = argparse.ArgumentParser(prog="hf-oto", description="Only Train Once (OTO) tools for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "benchmark", help="ONNX Runtime latency of a dense model vs its pruned version (interleaved runs)."
    )
    bench.add_argument("dense_dir", type=Path, help="Folder of the dense model (save_pretrained layout).")
    bench.add_argument("slim_dir", type=Path, help="Folder of the pruned model (hf_oto save_pruned_model).")
    bench.add_argument("--batch_size", type=_positive_int, default=1)
    bench.add_argument("--seq_length", type=_positive_int, default=128)
    bench.add_argument("--threads", type=_positive_int, default=None, help="ORT intra-op threads (default: ORT's).")
    bench.add_argument("--repeats", type=_positive_int, default=30, help="Timed rounds (each runs both models).")
    bench.add_argument("--warmup", type=_non_negative_int, default=5, help="Untimed rounds first.")
    bench.add_argument("--task", default=None, help="Optimum export task (inferred from the model class if unset).")
    bench.add_argument("--optimize", default=None, choices=["O1", "O2", "O3"], help="Optimum ORT optimization level.")
    bench.add_argument(
        "--allow_spinning", action="store_true", help="Let ORT threads spin between operators (ORT's default)."
    )
    bench.add_argument("--json", type=Path, default=None, help="Also write the result as JSON to this file.")
    bench.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")

    export = commands.add_parser("export", help="Export a saved (pruned or dense) model to ONNX through Optimum.")
    export.add_argument("model_dir", type=Path, help="Folder of the model.")
    export.add_argument("output_dir", type=Path, help="Folder for model.onnx (e.g. <model_dir>/onnx).")
    export.add_argument("--task", default=None, help="Optimum export task (inferred from the model class if unset).")
    export.add_argument("--opset", type=_positive_int, default=None)
    export.add_argument(
        "--overwrite", action="store_true", help="Replace the output folder (all of it) if it is not empty."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-oto` console script; returns the exit status.

    Example:

    ```python
    >>> from hf_oto.cli import main

    >>> main(["benchmark", "dense-folder", "slim-folder", "--repeats", "10"])  # doctest: +SKIP
    ```
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .modeling import load_model_folder
    from .onnx import export_onnx
    from .speedup import benchmark_speedup

    if args.command == "benchmark":
        result = benchmark_speedup(
            args.dense_dir,
            args.slim_dir,
            batch_size=args.batch_size,
            seq_length=args.seq_length,
            num_threads=args.threads,
            warmup=args.warmup,
            repeats=args.repeats,
            task=args.task,
            progress=not args.no_progress,
            optimize=args.optimize,
            allow_spinning=args.allow_spinning,
        )
        result.dense_name, result.slim_name = str(args.dense_dir), str(args.slim_dir)
        print(result)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
        return 0
    model = load_model_folder(args.model_dir)
    export_onnx(model, args.output_dir, task=args.task, opset=args.opset, overwrite=args.overwrite)
    print(f"Exported {args.model_dir} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
