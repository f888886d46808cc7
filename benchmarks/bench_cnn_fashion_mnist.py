#!/usr/bin/env python
"""Dense vs OTO on Fashion-MNIST with CIFAR-layout conv nets on CPU, at a fixed budget (the paper's Tables 1-2).

For every architecture, runs `scripts/run_image_classification_oto.py` twice with the same data, seed, schedule and
base optimizer: once with `--dense_baseline` (no OTO), once with OTO (HSPG over channel groups, then pruning). Reports
top-1 of the dense model and of the slim OTO model, the slim model's FLOPs and parameters as a share of the full
model, and the channels OTO kept in every conv layer ("Architecture"). Writes a JSON file and prints a markdown table.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`).

Usage:

```bash
python benchmarks/bench_cnn_fashion_mnist.py --output_json benchmarks/bench_cnn_fashion_mnist.json
# the target mode at the FLOPs the paper mode reached (one architecture per run: each has its own target)
python benchmarks/bench_cnn_fashion_mnist.py --architectures vgg16_bn --oto_mode target --oto_target_flops 0.249 \
    --skip_dense --output_json benchmarks/bench_cnn_fashion_mnist_target_vgg.json
```

Defaults (the recorded run): VGG16-BN and ResNet-18, 20,000 training images, 2 epochs, batch 128, SGD momentum 0.9
at lr 0.05 (linear decay), weight decay 5e-4; OTO: HSPG `sgd`, λ 0.02, ε 0.3, initialization stage 30% of the steps,
`channel_penalty="norm"`, at most 60% of all groups and 80% of each family zeroed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]


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
        "--oto_pruning_periods",
        type=int,
        default=None,
        help="Target mode: selections in the pruning window (default: OTOTrainingArguments' default, recorded).",
    )
    parser.add_argument("--oto_lambda", type=float, default=0.02)
    parser.add_argument("--oto_epsilon", type=float, default=0.3)
    parser.add_argument("--oto_init_fraction", type=float, default=0.3)
    parser.add_argument("--oto_max_group_sparsity", type=float, default=0.6)
    parser.add_argument("--oto_max_family_sparsity", type=float, default=0.8)
    parser.add_argument("--oto_channel_penalty", choices=["conv_and_norm", "norm"], default="norm")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="outputs/bench-cnn-fashion-mnist")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--skip_dense", action="store_true", help="Only the OTO runs.")
    args = parser.parse_args(argv)
    if args.oto_mode == "target" and args.oto_pruning_periods is None:
        from hf_oto import OTOTrainingArguments

        fields = {f.name: f for f in dataclasses.fields(OTOTrainingArguments)}
        args.oto_pruning_periods = fields["oto_pruning_periods"].default  # recorded in the JSON's settings
    return args


def run_one(script, args, architecture: str, dense: bool) -> dict:
    output_dir = Path(args.output_dir) / f"{architecture}-{'dense' if dense else 'oto'}"
    argv = [
        "--architecture", architecture, "--idx_dir", args.idx_dir, "--output_dir", str(output_dir),
        "--overwrite_output_dir", "--do_train", "--do_eval", "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "256",
        "--learning_rate", str(args.learning_rate), "--weight_decay", str(args.weight_decay),
        "--max_train_samples", str(args.max_train_samples), "--seed", str(args.seed), "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "20", "--dataloader_num_workers", "0",
        "--oto_variant", args.oto_variant, "--oto_channel_penalty", args.oto_channel_penalty,
        "--oto_mode", args.oto_mode,
    ]  # fmt: skip
    if args.oto_mode == "paper":
        argv += ["--oto_lambda", str(args.oto_lambda), "--oto_epsilon", str(args.oto_epsilon)]
        argv += ["--oto_init_fraction", str(args.oto_init_fraction)]
        if args.oto_max_group_sparsity is not None:
            argv += ["--oto_max_group_sparsity", str(args.oto_max_group_sparsity)]
    else:
        argv += ["--oto_pruning_periods", str(args.oto_pruning_periods)]
        if args.oto_target_flops is not None:
            argv += ["--oto_target_flops", str(args.oto_target_flops)]
    if args.max_eval_samples:
        argv += ["--max_eval_samples", str(args.max_eval_samples)]
    if args.oto_max_family_sparsity is not None:
        argv += ["--oto_max_family_sparsity", str(args.oto_max_family_sparsity)]
    if dense:
        argv.append("--dense_baseline")
    start = time.time()
    results = script.main(argv)
    results["wall_seconds"] = time.time() - start
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    script = load_script()
    rows = []
    for architecture in args.architectures:
        dense = None if args.skip_dense else run_one(script, args, architecture, dense=True)
        oto = run_one(script, args, architecture, dense=False)
        rows.append(
            {
                "architecture": architecture,
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
        )
    report = {
        "settings": vars(args),
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    print("| model | dense top-1 | OTO top-1 | FLOPs | params | group sparsity |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        dense_top1 = f"{row['dense_top1']:.2%}" if row["dense_top1"] is not None else "-"
        print(
            f"| {row['architecture']} | {dense_top1} | {row['oto_top1']:.2%} | {row['flops_ratio']:.1%} | "
            f"{row['params_ratio']:.1%} | {row['group_sparsity']:.1%} |"
        )
    for row in rows:
        print(f"{row['architecture']} architecture: {row['oto_architecture']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
