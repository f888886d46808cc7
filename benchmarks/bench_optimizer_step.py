"""Per-step time of HSPG against torch's foreach AdamW and SGD-momentum on BERT-base-sized parameters (CPU).

Usage:

```bash
/work/.venv/bin/python benchmarks/bench_optimizer_step.py                     # BERT-base, 1 thread, 41 timed pairs
/work/.venv/bin/python benchmarks/bench_optimizer_step.py --repeats 61 --threads 2 --output results.json
/work/.venv/bin/python benchmarks/bench_optimizer_step.py --layers 2 --repeats 11  # a quicker, smaller run
```

Each optimizer gets its own copy of the parameters of `BertModel(BertConfig())` (random weights) and the same fixed
random gradients. Steps of HSPG and of the reference are interleaved one by one, alternating which goes first
(H, R, R, H, H, R, ...), so that machine noise hits both alike; each pair of consecutive steps gives one ratio
HSPG / reference. The table reports the median step times and the median ratio with its interquartile range
(p25-p75) over the pairs. The machine's load average is recorded before and after. Stages:

- `initialization`: subgradient steps (`init_steps` larger than the run);
- `half_space`: half-space steps, no zero group yet;
- `half_space+zeros`: half-space steps with `--zero_fraction` of the groups already zero (every family then has zero
  groups, the worst case: the rows of the zero groups are refilled with zeros in the parameters and in the optimizer
  state every step).

The target mode (`HSPG(mode="target")`, goal: ≤ 1.15x AdamW) in three stages:

- `target:scoring`: every step accumulates the groups' Taylor saliency (the steps before each selection);
- `target:ramping`: saliency plus ramps: a selection at step 0 put 12.5% of the FLOPs on their way to zero, and each
  step projects those groups onto their shrinking radius (the busiest steps of the mode);
- `target:zeros`: after the pruning window: `--zero_fraction` of the groups zero, no scoring, no ramp.

```bash
/work/.venv/bin/python benchmarks/bench_optimizer_step.py --variants adamw --stages target:scoring target:ramping \
    target:zeros --output benchmarks/bench_optimizer_step_target.json
```
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from hf_oto.optim import HSPG, PruningTarget
from hf_oto.zig import build_zigs


STAGES = ("initialization", "half_space", "half_space+zeros", "target:scoring", "target:ramping", "target:zeros")
REFERENCES = {"adamw": "AdamW(foreach)", "sgd": "SGD(momentum=0.9, foreach)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="Number of BERT layers (BERT-base: 12).")
    parser.add_argument("--repeats", type=int, default=41, help="Timed step pairs (HSPG + reference) per cell.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per optimizer and cell.")
    parser.add_argument("--zero_fraction", type=float, default=0.3, help="Zero groups in the half_space+zeros cell.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on shared cores a multi-threaded op waits for its slowest thread).",
    )
    parser.add_argument("--variants", nargs="+", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument(
        "--output", type=str, default=str(Path(__file__).with_name("bench_optimizer_step.json")), help="JSON path."
    )
    return parser.parse_args(argv)


def make_pair(args, base: torch.nn.Module, variant: str, stage: str):
    model = copy.deepcopy(base)
    twin = copy.deepcopy(base)
    zigs = build_zigs(model)
    if stage == "half_space+zeros":
        zigs.set_zero(zigs.random_zero_mask(args.zero_fraction, generator=torch.Generator().manual_seed(0)))
    generator = torch.Generator().manual_seed(1)
    for param, other in zip(model.parameters(), twin.parameters()):
        grad = torch.randn(param.shape, generator=generator) * 1e-3
        param.grad = grad
        other.grad = grad
    init_steps = 10**9 if stage == "initialization" else 0
    if stage.startswith("target:"):
        # scoring: the window's first selection lies beyond the run, so every step scores; ramping: a selection at
        # step 0 and ramps longer than the run; zeros: a window of 4 steps, over before the timed steps.
        period = 4 if stage == "target:zeros" else 10**6
        target = dict(
            mode="target",
            init_steps=period if stage == "target:scoring" else 0,
            pruning_steps=4 * period,
            pruning_periods=4,
            target=PruningTarget(flops=0.5),
        )
        if stage == "target:zeros":
            zigs.set_zero(zigs.random_zero_mask(args.zero_fraction, generator=torch.Generator().manual_seed(0)))
        if variant == "adamw":
            hspg = HSPG(model.parameters(), zigs, lr=1e-5, weight_decay=0.01, **target)
            reference = torch.optim.AdamW(twin.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)
        else:
            hspg = HSPG(model.parameters(), zigs, lr=1e-5, variant="sgd", momentum=0.9, **target)
            reference = torch.optim.SGD(twin.parameters(), lr=1e-5, momentum=0.9, foreach=True)
        return model, hspg, reference, zigs
    # lmbda/lr chosen so that the half-space test zeroes (almost) nothing: the cost measured is the steady state.
    if variant == "adamw":
        hspg = HSPG(model.parameters(), zigs, lr=1e-5, lmbda=1e-3, weight_decay=0.01, init_steps=init_steps)
        reference = torch.optim.AdamW(twin.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)
    else:
        hspg = HSPG(model.parameters(), zigs, lr=1e-5, lmbda=1e-3, variant="sgd", momentum=0.9, init_steps=init_steps)
        reference = torch.optim.SGD(twin.parameters(), lr=1e-5, momentum=0.9, foreach=True)
    return model, hspg, reference, zigs


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def time_pair(hspg, reference, args) -> dict:
    warmup = args.warmup
    if hspg.schedule is not None and hspg.schedule.end < 100:  # target:zeros: time the steps after the window
        warmup = max(warmup, hspg.schedule.end + 1)
    for _ in range(warmup):
        hspg.step()
        reference.step()
    times_h, times_r = [], []
    for repeat in range(args.repeats):
        order = ((hspg, times_h), (reference, times_r))
        for optimizer, times in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
    ratios = [h / r for h, r in zip(times_h, times_r)]
    return dict(
        hspg_ms=1e3 * statistics.median(times_h),
        reference_ms=1e3 * statistics.median(times_r),
        ratio=statistics.median(ratios),
        ratio_p25=quantile(ratios, 0.25),
        ratio_p75=quantile(ratios, 0.75),
        ratio_of_medians=statistics.median(times_h) / statistics.median(times_r),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    base = BertModel(BertConfig(num_hidden_layers=args.layers))
    rows = []
    for variant in args.variants:
        reference_name = REFERENCES[variant]
        for stage in args.stages:
            model, hspg, reference, zigs = make_pair(args, base, variant, stage)
            timing = time_pair(hspg, reference, args)
            rows.append(
                dict(variant=variant, reference=reference_name, stage=stage, group_sparsity=zigs.group_sparsity())
                | timing
            )
            del model, hspg, reference, zigs
    num_params = sum(p.numel() for p in base.parameters())
    result = dict(
        model=f"BertModel(BertConfig(num_hidden_layers={args.layers}))",
        num_parameters=num_params,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        repeats=args.repeats,
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        cpu_count=os.cpu_count(),
        rows=rows,
    )
    print(
        f"{result['model']}: {num_params / 1e6:.1f}M parameters, {result['threads']} threads, torch {torch.__version__}, "
        f"{args.repeats} timed pairs per cell, load average (1/5/15 min) before "
        f"{'/'.join(f'{v:.1f}' for v in load_before)}, after {'/'.join(f'{v:.1f}' for v in result['load_average_after'])} "
        f"on {os.cpu_count()} cores"
    )
    print()
    print(
        "| HSPG variant | reference | stage | HSPG ms/step | reference ms/step | ratio (median of pairs) | "
        "ratio p25-p75 | group sparsity |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['reference']} | {row['stage']} | {row['hspg_ms']:.1f} | "
            f"{row['reference_ms']:.1f} | {row['ratio']:.2f}x | {row['ratio_p25']:.2f}-{row['ratio_p75']:.2f} | "
            f"{row['group_sparsity']:.3f} |"
        )
    Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
