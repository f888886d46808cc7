#!/usr/bin/env python
"""Dense vs OTO on Fashion-MNIST with CIFAR-layout conv nets on CPU, at a fixed budget (the paper's Tables 1-2).

For every architecture and seed, runs `scripts/run_image_classification_oto.py` with the same data, seed, schedule and
base optimizer: once with `--dense_baseline` (no OTO), once with OTO (HSPG over channel groups, then pruning), and,
with `--uniform_baseline`, once more with `--dense_baseline --width_multiplier m`: the uniformly thinner network at
about the same FLOPs trained from scratch on the same budget (the classic baseline of a pruned network: what you get
by knowing the size in advance, without OTO). Reports top-1 of each, the slim model's FLOPs and parameters as a share
of the full model, and the channels OTO kept in every conv layer ("Architecture"); with several seeds, mean ± s.d.
Writes a JSON file and prints markdown tables.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`).

Usage:

```bash
python benchmarks/bench_cnn_fashion_mnist.py --output_json benchmarks/bench_cnn_fashion_mnist.json
# the target mode at the FLOPs the paper mode reached (one architecture per run: each has its own target)
python benchmarks/bench_cnn_fashion_mnist.py --architectures vgg16_bn --oto_mode target --oto_target_flops 0.249 \
    --seeds 42 43 44 --uniform_baseline --output_json benchmarks/bench_cnn_fashion_mnist_target_vgg_3seeds.json
```

Defaults (the recorded runs): VGG16-BN and ResNet-18, 20,000 training images, 2 epochs, batch 128, SGD momentum 0.9
at lr 0.05 (linear decay), weight decay 5e-4, seed 42. OTO, paper mode: HSPG `sgd`, λ 0.02, ε 0.3, initialization
stage 30% of the steps, `channel_penalty="norm"`, at most 60% of all groups and 80% of each family zeroed. Target mode:
the from-scratch schedule (`FROM_SCRATCH_SCHEDULE`: first selection after 10% of the steps, 4 selections over the next
20%; see `benchmarks/README.md` for why), at most 80% of each family removed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]

FROM_SCRATCH_SCHEDULE = {"oto_init_fraction": 0.1, "oto_pruning_fraction": 0.2, "oto_pruning_periods": 4}
"""The target mode's schedule for a network trained from scratch on a short budget: select early (a young network's
channels are interchangeable, so an early choice costs little) and leave the slim network most of the run to train."""
PAPER_INIT_FRACTION = 0.3
"""The paper mode's initialization stage in this benchmark (fraction of the steps)."""


def load_script():
    """`scripts/run_image_classification_oto.py` as a module, with `scripts/` on `sys.path` for its imports of its
    sibling modules (`oto_example_args`), as when it runs as `python scripts/run_image_classification_oto.py`."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module("run_image_classification_oto")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", default=["vgg16_bn", "resnet18"])
    parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--max_train_samples", type=int, default=20000)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Default: the whole 10k test set.")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--oto_variant", choices=["adamw", "sgd"], default="sgd")
    parser.add_argument("--oto_mode", choices=["paper", "target"], default="paper")
    parser.add_argument("--oto_target_flops", type=float, default=None, help="Target mode: FLOPs fraction to keep.")
    parser.add_argument(
        "--oto_init_fraction",
        type=float,
        default=None,
        help=f"Steps before OTO starts (default: paper mode {PAPER_INIT_FRACTION}, target mode "
        f"{FROM_SCRATCH_SCHEDULE['oto_init_fraction']}).",
    )
    parser.add_argument(
        "--oto_pruning_fraction",
        type=float,
        default=None,
        help=f"Target mode: steps of the pruning window (default {FROM_SCRATCH_SCHEDULE['oto_pruning_fraction']}).",
    )
    parser.add_argument(
        "--oto_pruning_periods",
        type=int,
        default=None,
        help=f"Target mode: selections in the pruning window (default {FROM_SCRATCH_SCHEDULE['oto_pruning_periods']}).",
    )
    parser.add_argument("--oto_lambda", type=float, default=0.02)
    parser.add_argument("--oto_epsilon", type=float, default=0.3)
    parser.add_argument("--oto_max_group_sparsity", type=float, default=0.6)
    parser.add_argument("--oto_max_family_sparsity", type=float, default=0.8)
    parser.add_argument("--oto_channel_penalty", choices=["conv_and_norm", "norm"], default="norm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument(
        "--uniform_baseline",
        action="store_true",
        help="Also train the uniformly thinner network (every width times --uniform_width_multiplier) from scratch.",
    )
    parser.add_argument(
        "--uniform_width_multiplier",
        type=float,
        default=None,
        help="Default: the square root of --oto_target_flops (of the OTO run's FLOPs share in the paper mode), "
        "rounded to 2 decimals, so the thinner network has about the slim model's FLOPs (reported as measured).",
    )
    parser.add_argument("--output_dir", default="outputs/bench-cnn-fashion-mnist")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--skip_dense", action="store_true", help="No dense runs (OTO and the uniform baseline only).")
    args = parser.parse_args(argv)
    if args.oto_mode == "paper":
        extra = [name for name in ("oto_pruning_fraction", "oto_pruning_periods") if getattr(args, name) is not None]
        if extra:
            parser.error(f"--{extra[0]} belongs to the target mode; add --oto_mode target.")
        if args.oto_init_fraction is None:
            args.oto_init_fraction = PAPER_INIT_FRACTION
    else:
        for name, value in FROM_SCRATCH_SCHEDULE.items():  # the effective values are recorded in the JSON
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.uniform_width_multiplier is not None and args.uniform_width_multiplier <= 0:
        parser.error(f"--uniform_width_multiplier must be positive; got {args.uniform_width_multiplier}.")
    return args


def common_argv(args: argparse.Namespace, architecture: str, seed: int, run_name: str) -> list[str]:
    output_dir = Path(args.output_dir) / f"{architecture}-{run_name}-seed{seed}"
    argv = [
        "--architecture", architecture, "--idx_dir", args.idx_dir, "--output_dir", str(output_dir),
        "--overwrite_output_dir", "--do_train", "--do_eval", "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "256",
        "--learning_rate", str(args.learning_rate), "--weight_decay", str(args.weight_decay),
        "--max_train_samples", str(args.max_train_samples), "--seed", str(seed), "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "20", "--dataloader_num_workers", "0",
        "--oto_variant", args.oto_variant,
    ]  # fmt: skip
    if args.max_eval_samples:
        argv += ["--max_eval_samples", str(args.max_eval_samples)]
    return argv


def oto_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--oto_channel_penalty", args.oto_channel_penalty, "--oto_mode", args.oto_mode]
    argv += ["--oto_init_fraction", str(args.oto_init_fraction)]
    if args.oto_mode == "paper":
        argv += ["--oto_lambda", str(args.oto_lambda), "--oto_epsilon", str(args.oto_epsilon)]
        if args.oto_max_group_sparsity is not None:
            argv += ["--oto_max_group_sparsity", str(args.oto_max_group_sparsity)]
    else:
        argv += ["--oto_pruning_fraction", str(args.oto_pruning_fraction)]
        argv += ["--oto_pruning_periods", str(args.oto_pruning_periods)]
        if args.oto_target_flops is not None:
            argv += ["--oto_target_flops", str(args.oto_target_flops)]
    if args.oto_max_family_sparsity is not None:
        argv += ["--oto_max_family_sparsity", str(args.oto_max_family_sparsity)]
    return argv


def timed(script, argv: list[str]) -> dict:
    start = time.time()
    results = script.main(argv)
    results["wall_seconds"] = time.time() - start
    return results


def width_multiplier_for(args: argparse.Namespace, oto: dict) -> float:
    if args.uniform_width_multiplier is not None:
        return args.uniform_width_multiplier
    flops = args.oto_target_flops if args.oto_mode == "target" and args.oto_target_flops else oto["flops_ratio"]
    return round(math.sqrt(flops), 2)


def run_seed(script, args: argparse.Namespace, architecture: str, seed: int) -> dict:
    """Dense (unless `--skip_dense`), OTO and (with `--uniform_baseline`) the thinner network, for one seed."""
    dense = None
    if not args.skip_dense:
        dense = timed(script, [*common_argv(args, architecture, seed, "dense"), "--dense_baseline"])
    oto = timed(script, [*common_argv(args, architecture, seed, "oto"), *oto_argv(args)])
    row = {
        "architecture": architecture,
        "seed": seed,
        "dense_top1": dense["eval_accuracy"] if dense else None,
        "oto_top1": oto["eval_accuracy"],
        "flops_ratio": oto["flops_ratio"],
        "params_ratio": oto["params_ratio"],
        "group_sparsity": oto["group_sparsity"],
        "oto_architecture": oto["architecture"],
        "channels_before": oto["channels_before"],
        "dense_flops": oto["dense_flops"],
        "dense_params": oto["dense_params"],
        "dense_wall_seconds": dense["wall_seconds"] if dense else None,
        "oto_wall_seconds": oto["wall_seconds"],
    }
    if args.uniform_baseline:
        multiplier = width_multiplier_for(args, oto)
        argv = common_argv(args, architecture, seed, f"uniform{multiplier}")
        uniform = timed(script, [*argv, "--dense_baseline", "--width_multiplier", str(multiplier)])
        row.update(
            uniform_width_multiplier=multiplier,
            uniform_top1=uniform["eval_accuracy"],
            uniform_flops_ratio=uniform["dense_flops"] / oto["dense_flops"],
            uniform_params_ratio=uniform["dense_params"] / oto["dense_params"],
            uniform_wall_seconds=uniform["wall_seconds"],
        )
    return row


def mean_sd(values: list[float]) -> str:
    """`"85.67%"` for one value, `"85.67 ± 0.30%"` (sample s.d.) for several, `"-"` for none."""
    values = [100 * value for value in values if value is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}%"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}%"


def summary_rows(rows: list[dict]) -> list[str]:
    """One markdown line per architecture: mean ± s.d. over the seeds of each method, and the paired differences."""
    lines = [
        "| model | seeds | dense top-1 | OTO top-1 | OTO − dense | uniform thinner top-1 | FLOPs OTO / uniform |",
        "|---|---|---|---|---|---|---|",
    ]
    for architecture in dict.fromkeys(row["architecture"] for row in rows):
        runs = [row for row in rows if row["architecture"] == architecture]
        paired = [row["oto_top1"] - row["dense_top1"] for row in runs if row["dense_top1"] is not None]
        delta = "-"
        if paired:
            delta = f"{100 * statistics.mean(paired):+.2f}"
            if len(paired) > 1:
                delta += f" (per seed {', '.join(f'{100 * d:+.2f}' for d in paired)})"
        uniform = [row.get("uniform_top1") for row in runs]
        flops = f"{statistics.mean(row['flops_ratio'] for row in runs):.1%}"
        if any(value is not None for value in uniform):
            flops += (
                f" / {statistics.mean(row['uniform_flops_ratio'] for row in runs if 'uniform_flops_ratio' in row):.1%}"
            )
        lines.append(
            f"| {architecture} | {', '.join(str(row['seed']) for row in runs)} | "
            f"{mean_sd([row['dense_top1'] for row in runs])} | {mean_sd([row['oto_top1'] for row in runs])} | "
            f"{delta} | {mean_sd(uniform)} | {flops} |"
        )
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    script = load_script()
    rows = [run_seed(script, args, architecture, seed) for architecture in args.architectures for seed in args.seeds]
    report = {
        "settings": vars(args),
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    print("| model | seed | dense top-1 | OTO top-1 | FLOPs | params | group sparsity | uniform thinner top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['architecture']} | {row['seed']} | {mean_sd([row['dense_top1']])} | {mean_sd([row['oto_top1']])} "
            f"| {row['flops_ratio']:.1%} | {row['params_ratio']:.1%} | {row['group_sparsity']:.1%} | "
            f"{mean_sd([row.get('uniform_top1')])} |"
        )
    print()
    print("\n".join(summary_rows(rows)))
    for row in rows:
        print(f"{row['architecture']} (seed {row['seed']}) architecture: {row['oto_architecture']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
