"""HSPG against proximal SGD (Prox-SG) on the same group-lasso problem, with real data (Fashion-MNIST).

The paper's central optimisation claim (Section 3.3): on `f(x) + lmbda * sum_g ||x_g||`, HSPG finds far more zero
groups than Prox-SG at a comparable objective. Both methods here get the same model and initial weights, the same
mini-batches in the same order, the same `lmbda`, the same learning-rate schedule and the same step budget:

- **Prox-SG**: `x <- prox_{lr * lmbda * ||.||}(x - lr * grad f(x))`, i.e. an SGD step followed by group
  soft-thresholding `x_g <- max(0, 1 - lr * lmbda / ||x_g||) * x_g` (implemented here: it is the baseline);
- **HSPG** (`hf_oto.optim.HSPG`, `variant="sgd"`, `momentum=0`): subgradient steps for the first
  `--init_fraction` of the budget, then half-space steps.

Model: an MLP `784 -> 512 -> 256 -> 10` (`--activation relu`, the default, or `gelu`); its groups are the hidden neurons (row of the layer's weight and
bias; the next layer's input column is the dependent). Data: Fashion-MNIST (60k train / 10k test) from the Debian
package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), IDX files read with gzip + numpy.

The paper's argument for HSPG (Section 3.3) is about the regime where `lr * lmbda` is small compared with the group
norms: Prox-SG only zeroes a group whose trial point falls in a ball of radius `lr * lmbda`, which vanishes with
`lr * lmbda`, while HSPG's half-space region does not. `--settings LR:LMBDA ...` runs a sweep over `(lr, lmbda)`
pairs (each with the same budget and schedule for both methods) and prints one table over all of them.

With ReLU a neuron the penalty drives negative on every input is dead: its loss gradient is exactly zero, so
soft-thresholding zeroes it as surely as the half-space test does. With GELU (the transformer FFN activation,
`GELU'(0) = 1/2`) a zero neuron still gets a loss gradient; Prox-SG then keeps it at zero only while the mini-batch
gradient of the group has norm <= `lmbda`, whereas HSPG never revives a zero group. `--epsilon E ...` runs HSPG once
per value of its half-space parameter (Prox-SG, which has none, runs once per `(lr, lmbda)` pair); the JSON then has
one entry of `runs` per `(lr, lmbda, epsilon)`, each holding that HSPG run and the shared Prox-SG run.

Usage:

```bash
/work/.venv/bin/python benchmarks/bench_hspg_vs_proxsg.py                       # lr 0.1, lmbda 5e-3: ~5 min on 2 cores
/work/.venv/bin/python benchmarks/bench_hspg_vs_proxsg.py --settings 0.01:1e-3 --output /tmp/proxsg_0.01.json
/work/.venv/bin/python benchmarks/bench_hspg_vs_proxsg.py --settings 0.1:5e-3 0.01:1e-3 0.001:1e-3  # ~15 min
/work/.venv/bin/python benchmarks/bench_hspg_vs_proxsg.py --activation gelu --epsilon 0 0.05 0.2 --settings 0.1:3e-3
```
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_oto.optim import HSPG
from hf_oto.zig import ZIGFamily, ZIGMember, ZIGSet


DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", type=Path, default=DATA_DIR)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="Initial learning rate (both methods).")
    parser.add_argument("--lr_decay_epochs", type=int, nargs="*", default=None, help="Epochs where lr /= 10.")
    parser.add_argument("--lmbda", type=float, default=5e-3, help="Group-lasso weight (both methods).")
    parser.add_argument(
        "--settings",
        type=str,
        nargs="+",
        default=None,
        metavar="LR:LMBDA",
        help="Sweep: one run of both methods per (initial lr, lmbda) pair, e.g. `0.1:5e-3 0.01:1e-3`. Default: the "
        "single pair --lr, --lmbda.",
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        nargs="+",
        default=[0.0],
        help="HSPG's half-space parameter, in [0, 1); several values: one HSPG run per value (Prox-SG runs once).",
    )
    parser.add_argument(
        "--activation", choices=sorted(ACTIVATIONS), default="relu", help="Hidden-layer activation of the MLP."
    )
    parser.add_argument(
        "--near_zero_tol",
        type=float,
        default=1e-3,
        help="Also count the non-zero groups whose norm is at most this (reported as near_zero_groups).",
    )
    parser.add_argument("--init_fraction", type=float, default=0.3, help="Share of steps in HSPG's init stage.")
    parser.add_argument("--hidden", type=int, nargs=2, default=(512, 256))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--output", type=str, default=str(Path(__file__).with_name("bench_hspg_vs_proxsg.json")), help="JSON path."
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x}).")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not (data_dir / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"Fashion-MNIST not found under {data_dir}: `apt-get install dataset-fashion-mnist`.")
    arrays = [
        read_idx(data_dir / f"{name}-idx{n}-ubyte.gz")
        for name, n in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1))
    ]
    train_x, train_y, test_x, test_y = (torch.from_numpy(a.copy()) for a in arrays)
    train_x = train_x.reshape(len(train_x), -1).float() / 255
    test_x = test_x.reshape(len(test_x), -1).float() / 255
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y.long(), (test_x - mean) / std, test_y.long()


class MLP(nn.Module):
    def __init__(self, hidden: tuple[int, int], activation: str = "relu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(784, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.activation(self.fc2(self.activation(self.fc1(x)))))


def neuron_zigs(model: MLP) -> ZIGSet:
    families = []
    for layer, following in (("fc1", "fc2"), ("fc2", "fc3")):
        families.append(
            ZIGFamily(
                name=f"{layer}.neurons",
                kind="neurons",
                num_groups=getattr(model, layer).out_features,
                members=(ZIGMember(f"{layer}.weight", 0), ZIGMember(f"{layer}.bias", 0)),
                dependents=(ZIGMember(f"{following}.weight", 1),),
            )
        )
    return ZIGSet(model, families)


# ----------------------------------------------------------------------------------------------------------------
# Prox-SG (the baseline)
# ----------------------------------------------------------------------------------------------------------------
class ProxSG(torch.optim.Optimizer):
    """Proximal SGD for `f + lmbda * sum_g ||x_g||`: an SGD step, then group soft-thresholding of every group."""

    def __init__(self, params, zigs: ZIGSet, lr: float, lmbda: float):
        super().__init__(params, dict(lr=lr))
        self.zigs, self.lmbda = zigs, lmbda

    @torch.no_grad()
    def step(self, closure=None):
        lr = self.param_groups[0]["lr"]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])
        for family, norm in zip(self.zigs.families, self.zigs.family_norms()):
            scale = torch.clamp(1 - lr * self.lmbda / norm.clamp(min=1e-30), min=0)
            scale = torch.where(norm > 0, scale, torch.zeros_like(scale))
            for member in family.members:
                param = self.zigs.parameter(member.param_name)
                param.view(family.num_groups, -1).mul_(scale.view(-1, 1))


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MLP, zigs: ZIGSet, lmbda: float, data, near_zero_tol: float = 1e-3) -> dict:
    train_x, train_y, test_x, test_y = data
    train_loss = sum(
        F.cross_entropy(model(train_x[i : i + 10000]), train_y[i : i + 10000], reduction="sum").item()
        for i in range(0, len(train_x), 10000)
    ) / len(train_x)
    norms = torch.cat(zigs.family_norms())
    penalty = norms.sum().item()
    test_accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return dict(
        objective=train_loss + lmbda * penalty,
        train_loss=train_loss,
        group_penalty=penalty,
        test_accuracy=test_accuracy,
        group_sparsity=zigs.group_sparsity(),
        zero_groups=zigs.num_zero_groups(),
        kept_neurons=zigs.kept_groups(),
        near_zero_groups=int(((norms > 0) & (norms <= near_zero_tol)).sum()),
        min_nonzero_group_norm=norms[norms > 0].min().item() if bool((norms > 0).any()) else None,
    )


def run(method: str, args, data, lr: float, lmbda: float, epsilon: float = 0.0) -> dict:
    torch.manual_seed(args.seed)
    model = MLP(tuple(args.hidden), args.activation)
    zigs = neuron_zigs(model)
    train_x, train_y = data[0], data[1]
    steps_per_epoch = len(train_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    if method == "HSPG":
        optimizer = HSPG(
            model.parameters(),
            zigs,
            lr=lr,
            lmbda=lmbda,
            epsilon=epsilon,
            init_steps=int(args.init_fraction * total),
            variant="sgd",
            momentum=0.0,
        )
    else:
        optimizer = ProxSG(model.parameters(), zigs, lr=lr, lmbda=lmbda)
    decay_epochs = args.lr_decay_epochs if args.lr_decay_epochs is not None else [int(0.75 * args.epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [e * steps_per_epoch for e in decay_epochs], 0.1)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), generator=generator)
        model.train()
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(train_x[index]), train_y[index]).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        metrics = evaluate(model, zigs, lmbda, data, args.near_zero_tol)
        history.append(dict(epoch=epoch + 1, **{k: v for k, v in metrics.items() if k != "kept_neurons"}))
        label = f"HSPG(eps={epsilon:g})" if method == "HSPG" else method
        print(
            f"  {args.activation} lr {lr:g} lmbda {lmbda:g} {label:15s} epoch {epoch + 1:3d}: "
            f"objective {metrics['objective']:.4f}  loss {metrics['train_loss']:.4f}  "
            f"sparsity {metrics['group_sparsity']:.3f}  near-zero {metrics['near_zero_groups']}  "
            f"test acc {metrics['test_accuracy']:.4f}",
            flush=True,
        )
    metrics["seconds"] = time.perf_counter() - start
    metrics["steps"] = total
    metrics["history"] = history
    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist(args.data_dir)
    settings = [(args.lr, args.lmbda)]
    if args.settings is not None:
        settings = [tuple(float(value) for value in setting.split(":")) for setting in args.settings]
    for epsilon in args.epsilon:
        if not 0.0 <= epsilon < 1.0:
            raise SystemExit(f"--epsilon {epsilon}: must be in [0, 1).")
    runs = []
    for lr, lmbda in settings:
        prox_sg = run("Prox-SG", args, data, lr, lmbda)  # no epsilon: one run, shared by the entries below
        for epsilon in args.epsilon:
            results = {"Prox-SG": prox_sg, "HSPG": run("HSPG", args, data, lr, lmbda, epsilon)}
            runs.append(dict(lr=lr, lmbda=lmbda, epsilon=epsilon, activation=args.activation, results=results))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    # `epsilon` stays a number for a single value (the JSON of earlier runs); `epsilons` always lists them all.
    config["epsilons"] = list(args.epsilon)
    config["epsilon"] = args.epsilon[0] if len(args.epsilon) == 1 else list(args.epsilon)
    output = dict(config=config, threads=torch.get_num_threads(), torch=torch.__version__, runs=runs)
    groups = sum(args.hidden)
    steps = runs[0]["results"]["HSPG"]["steps"]
    print()
    print(
        f"MLP 784-{args.hidden[0]}-{args.hidden[1]}-10 ({args.activation}) on Fashion-MNIST, {groups} neuron groups, "
        f"{args.epochs} epochs "
        f"({steps} steps), batch {args.batch_size}, HSPG init stage {args.init_fraction:.0%} of the steps"
    )
    print()
    print(
        "| activation | lr | λ | lr·λ | method | ε | objective f + λΣ‖x_g‖ | train loss f | group sparsity | "
        f"zero groups | near-zero groups (≤ {args.near_zero_tol:g}) | kept neurons (fc1, fc2) | test accuracy |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    printed = set()
    for entry in runs:
        for method, m in entry["results"].items():
            if id(m) in printed:  # the Prox-SG run shared by several epsilons
                continue
            printed.add(id(m))
            kept = ", ".join(str(v) for v in m["kept_neurons"].values())
            epsilon = f"{entry['epsilon']:g}" if method == "HSPG" else "-"
            print(
                f"| {entry['activation']} | {entry['lr']:g} | {entry['lmbda']:g} | {entry['lr'] * entry['lmbda']:.0e} | "
                f"{method} | {epsilon} | {m['objective']:.4f} | {m['train_loss']:.4f} | {m['group_sparsity']:.3f} | "
                f"{m['zero_groups']} / {groups} | {m['near_zero_groups']} | {kept} | {m['test_accuracy']:.4f} |"
            )
    Path(args.output).write_text(json.dumps(output, indent=2, sort_keys=True))
    return output


if __name__ == "__main__":
    main()
