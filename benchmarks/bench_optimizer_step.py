"""Per-step time of HSPG against torch's foreach AdamW and SGD-momentum on BERT-base-sized parameters (CPU).

Usage:

```bash
/work/.venv/bin/python benchmarks/bench_optimizer_step.py                   # BERT-base, 15 timed steps per cell
/work/.venv/bin/python benchmarks/bench_optimizer_step.py --repeats 31 --output results.json
/work/.venv/bin/python benchmarks/bench_optimizer_step.py --layers 2         # a quicker, smaller run
```

Each optimizer gets its own copy of the parameters of `BertModel(BertConfig())` (random weights) and the same fixed
random gradients. Steps of HSPG and of the reference are interleaved (A, B, A, B, ...) so that machine noise hits
both alike; the table reports the median step time of each and the ratio HSPG / reference. Stages:

- `initialization`: subgradient steps (`init_steps` larger than the run);
- `half_space`: half-space steps, no zero group yet;
- `half_space+zeros`: half-space steps with `--zero_fraction` of the groups already zero (every family then has zero
  groups, the worst case: the rows of the zero groups are masked in the parameters and in the optimizer state).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from hf_oto.optim import HSPG
from hf_oto.zig import build_zigs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="Number of BERT layers (BERT-base: 12).")
    parser.add_argument("--repeats", type=int, default=15, help="Timed steps per optimizer and cell.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per optimizer and cell.")
    parser.add_argument("--zero_fraction", type=float, default=0.3, help="Zero groups in the half_space+zeros cell.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
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
    # lmbda/lr chosen so that the half-space test zeroes (almost) nothing: the cost measured is the steady state.
    if variant == "adamw":
        hspg = HSPG(model.parameters(), zigs, lr=1e-5, lmbda=1e-3, weight_decay=0.01, init_steps=init_steps)
        reference = torch.optim.AdamW(twin.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)
    else:
        hspg = HSPG(model.parameters(), zigs, lr=1e-5, lmbda=1e-3, variant="sgd", momentum=0.9, init_steps=init_steps)
        reference = torch.optim.SGD(twin.parameters(), lr=1e-5, momentum=0.9, foreach=True)
    return model, hspg, reference, zigs


def time_pair(hspg, reference, args) -> tuple[float, float]:
    for _ in range(args.warmup):
        hspg.step()
        reference.step()
    times_h, times_r = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        hspg.step()
        times_h.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference.step()
        times_r.append(time.perf_counter() - start)
    return statistics.median(times_h), statistics.median(times_r)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = BertModel(BertConfig(num_hidden_layers=args.layers))
    rows = []
    for variant, reference_name in (("adamw", "AdamW(foreach)"), ("sgd", "SGD(momentum=0.9, foreach)")):
        for stage in ("initialization", "half_space", "half_space+zeros"):
            model, hspg, reference, zigs = make_pair(args, base, variant, stage)
            hspg_time, reference_time = time_pair(hspg, reference, args)
            rows.append(
                dict(
                    variant=variant,
                    reference=reference_name,
                    stage=stage,
                    hspg_ms=1e3 * hspg_time,
                    reference_ms=1e3 * reference_time,
                    ratio=hspg_time / reference_time,
                    group_sparsity=zigs.group_sparsity(),
                )
            )
            del model, hspg, reference, zigs
    num_params = sum(p.numel() for p in base.parameters())
    result = dict(
        model=f"BertModel(BertConfig(num_hidden_layers={args.layers}))",
        num_parameters=num_params,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        repeats=args.repeats,
        rows=rows,
    )
    print(
        f"{result['model']}: {num_params / 1e6:.1f}M parameters, {result['threads']} threads, torch {torch.__version__}"
    )
    print()
    print("| HSPG variant | reference | stage | HSPG ms/step | reference ms/step | ratio | group sparsity |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['reference']} | {row['stage']} | {row['hspg_ms']:.1f} | "
            f"{row['reference_ms']:.1f} | {row['ratio']:.2f}x | {row['group_sparsity']:.3f} |"
        )
    Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
