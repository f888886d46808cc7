"""Tests of OTOTrainingArguments, OTOTrainer and the sparsity logging, on tiny models (CPU, a few steps each)."""

from __future__ import annotations

import copy
import json
import os
from unittest import mock

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_oto.callbacks import STAGE_IDS, OTOSparsityCallback, oto_sparsity_logs, unwrap_optimizer
from hf_oto.trainer import OTOTrainer
from hf_oto.training_args import OTOTrainingArguments
from hf_oto.zig import build_zigs

from .tiny_models import tiny_inputs, tiny_model


OTO_KEYS = ("oto/group_sparsity", "oto/group_sparsity_heads", "oto/group_sparsity_ffn", "oto/zero_groups", "oto/stage")
QUIET = dict(
    report_to="none", disable_tqdm=True, log_level="error", use_cpu=True, dataloader_num_workers=0, save_strategy="no"
)


def random_dataset(num_examples: int = 32, seq_length: int = 8, num_labels: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 99, (num_examples, seq_length), generator=generator)
    labels = torch.randint(0, num_labels, (num_examples,), generator=generator)
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}
        for ids, label in zip(input_ids, labels)
    ]


def oto_args(output_dir, **overrides) -> OTOTrainingArguments:
    kwargs = dict(
        QUIET,
        output_dir=str(output_dir),
        max_steps=20,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=2,
        logging_steps=1,
        seed=0,
        oto_mode="paper",
        oto_lambda=1.0,
        oto_init_steps=6,
    )
    kwargs.update(overrides)
    return OTOTrainingArguments(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# OTOTrainingArguments
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"oto_mode": "paper", "oto_lambda": 0.0}, "oto_lambda must be a finite number > 0; got 0.0"),
        ({"oto_mode": "paper", "oto_lambda": -1.0}, "got -1.0"),
        ({"oto_epsilon": 1.0}, r"oto_epsilon must be in \[0, 1\); got 1.0"),
        ({"oto_epsilon": -0.1}, "got -0.1"),
        ({"oto_init_steps": -1}, "oto_init_steps must be an integer >= 0"),
        ({"oto_init_fraction": 1.5}, r"oto_init_fraction must be in \[0, 1\]"),
        ({"oto_variant": "adam"}, r"oto_variant must be one of \['adamw', 'sgd'\]; got 'adam'"),
        ({"oto_momentum": 1.0}, r"oto_momentum must be in \[0, 1\)"),
        ({"oto_mode": "paper", "oto_max_group_sparsity": 0.0}, r"oto_max_group_sparsity must be in \(0, 1\]"),
        ({"oto_mode": "paper", "oto_max_group_sparsity": 1.2}, "got 1.2"),
        (
            {"oto_families": ["heads", "wings"]},
            r"drawn from \['heads', 'ffn', 'channels'\] .*; got \['heads', 'wings'\]",
        ),
        ({"oto_families": []}, "non-empty"),
        ({"oto_mode": "fast"}, r"oto_mode must be one of \['target', 'paper'\]"),
        ({"oto_lambda": 1.0}, r"oto_lambda belong\(s\) to the paper mode .*--oto_mode paper"),
        ({"oto_max_group_sparsity": 0.5}, r"oto_max_group_sparsity belong\(s\) to the paper mode"),
        ({"oto_mode": "paper", "oto_target_flops": 0.5}, r"oto_target_flops belong\(s\) to the target mode"),
        ({"oto_target_flops": 1.5}, r"flops target must be a fraction in \(0, 1\]"),
        ({"oto_target_params": 0.0}, r"params target must be a fraction in \(0, 1\]"),
        ({"oto_max_kind_sparsity": "heads:0.5"}, "kind=fraction"),
        ({"oto_max_kind_sparsity": "heads=1.5"}, r"max_kind_sparsity\['heads'\] must be a fraction"),
        ({"oto_min_kept_per_family": -1}, "min_kept_per_family must be >= 0"),
        ({"oto_pruning_periods": 0}, "oto_pruning_periods must be an integer >= 1"),
        ({"oto_pruning_fraction": 0.0}, r"oto_pruning_fraction must be in \(0, 1\]"),
        ({"oto_exclude": [""]}, "non-empty fnmatch patterns"),
    ],
)
def test_arguments_reject_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        OTOTrainingArguments(output_dir=str(tmp_path), report_to="none", **overrides)


def test_init_steps_win_over_fraction(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to="none")
    assert OTOTrainingArguments(**base).resolve_oto_init_steps(100) == 20  # target mode
    assert OTOTrainingArguments(**base, oto_mode="paper").resolve_oto_init_steps(100) == 50
    assert OTOTrainingArguments(**base, oto_init_fraction=0.25).resolve_oto_init_steps(10) == 2
    assert OTOTrainingArguments(**base, oto_init_steps=7, oto_init_fraction=0.9).resolve_oto_init_steps(100) == 7
    assert OTOTrainingArguments(**base, oto_init_steps=0).resolve_oto_init_steps(100) == 0


def test_arguments_parse_from_command_line_and_json_round_trip(tmp_path):
    parser = HfArgumentParser(OTOTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--report_to", "none",
            "--oto_mode", "paper", "--oto_lambda", "0.05", "--oto_epsilon", "0.1", "--oto_init_fraction", "0.3",
            "--oto_variant", "sgd", "--oto_momentum", "0.5", "--oto_max_group_sparsity", "0.8",
            "--oto_families", "heads", "--oto_exclude", "*.layer.0.*", "*.layer.2.*",
        ]
    )  # fmt: skip
    assert args.oto_lambda == 0.05 and args.oto_epsilon == 0.1 and args.oto_init_fraction == 0.3
    assert args.oto_init_steps is None and args.oto_variant == "sgd" and args.oto_momentum == 0.5
    assert args.oto_max_group_sparsity == 0.8
    assert args.oto_families == ["heads"] and args.oto_exclude == ["*.layer.0.*", "*.layer.2.*"]

    with pytest.raises(ValueError, match=r"oto_variant must be one of \['adamw', 'sgd'\]; got 'adam'"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--oto_variant", "adam"])

    # to_json_string masks the *_token fields; everything else must come back unchanged.
    saved = json.loads(args.to_json_string())
    path = tmp_path / "args.json"
    path.write_text(json.dumps({k: v for k, v in saved.items() if not k.endswith("_token")}))
    (from_file,) = parser.parse_json_file(str(path))
    assert from_file.to_dict() == args.to_dict()
    assert from_file.oto_hyperparameters() == args.oto_hyperparameters()

    defaults = OTOTrainingArguments(output_dir=str(tmp_path), report_to="none")
    saved = json.loads(defaults.to_json_string())
    (from_dict,) = parser.parse_dict({k: v for k, v in saved.items() if not k.endswith("_token")})
    assert from_dict.oto_families is None and from_dict.oto_exclude == []
    assert from_dict.oto_init_steps is None and from_dict.oto_max_group_sparsity is None


def test_bad_lambda_fails_before_trainer(tmp_path):
    with pytest.raises(ValueError, match="oto_lambda"):
        OTOTrainer(tiny_model("bert"), oto_args(tmp_path, oto_mode="paper", oto_lambda=float("nan")))


# ----------------------------------------------------------------------------------------------------------------
# Construction errors
# ----------------------------------------------------------------------------------------------------------------
def test_unsupported_model_fails_at_construction(tmp_path):
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    with pytest.raises(ValueError, match="model_type='gpt2'.*Supported model types"):
        OTOTrainer(GPT2LMHeadModel(config), oto_args(tmp_path), train_dataset=random_dataset(4))


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="OTOTrainingArguments"):
        OTOTrainer(tiny_model("bert"), TrainingArguments(output_dir=str(tmp_path), report_to="none"))


def test_bad_exclude_pattern_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="matches no group family"):
        OTOTrainer(tiny_model("bert"), oto_args(tmp_path, oto_exclude=["*.decoder.*"]))


def test_output_dir_holding_another_model_is_refused_before_training(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    trainer = OTOTrainer(tiny_model("bert"), oto_args(tmp_path, max_steps=2), train_dataset=random_dataset(8))
    with pytest.raises(ValueError, match=r"not this run's resumable state: config\.json.*overwrite_output_dir=True"):
        trainer.train()
    assert trainer.state.global_step == 0 and sorted(os.listdir(tmp_path)) == ["config.json"]
    trainer = OTOTrainer(
        tiny_model("bert"), oto_args(tmp_path, max_steps=2, overwrite_output_dir=True), train_dataset=random_dataset(8)
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_checkpoints_of_another_run_survive_save_total_limit(tmp_path):
    """Checkpoint rotation deletes every old `checkpoint-*` of the folder: another model's checkpoints, and this
    model's without an explicit resume, refuse the run before any step instead."""
    data = random_dataset(8)
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=1)
    first = OTOTrainer(tiny_model("bert"), oto_args(tmp_path / "bert", **overrides), train_dataset=data)
    first.train()
    assert sorted(os.listdir(tmp_path / "bert")) == ["checkpoint-4"]
    assert not (tmp_path / "bert" / "_hf_oto_run.lock").exists()  # released; never inside a checkpoint
    assert not any("lock" in name for name in os.listdir(tmp_path / "bert" / "checkpoint-4"))

    other = OTOTrainer(tiny_model("distilbert"), oto_args(tmp_path / "bert", **overrides), train_dataset=data)
    for resume in (None, True):
        with pytest.raises(ValueError, match=r"checkpoint-4 \(a checkpoint of BertForSequenceClassification, not of"):
            other.train(resume_from_checkpoint=resume)
    again = OTOTrainer(tiny_model("bert"), oto_args(tmp_path / "bert", **overrides), train_dataset=data)
    with pytest.raises(ValueError, match=r"state of an earlier run \(checkpoint-4\).*--resume_from_checkpoint"):
        again.train()
    assert sorted(os.listdir(tmp_path / "bert")) == ["checkpoint-4"]
    again.train(resume_from_checkpoint=True)  # the allowed path: resuming its own checkpoints
    assert again.state.global_step == 4


def test_a_second_run_on_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    lock_file = tmp_path / "_hf_oto_run.lock"
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00", "command": "x"}
    lock_file.write_text(json.dumps(holder))  # a live run: our parent process
    trainer = OTOTrainer(tiny_model("bert"), oto_args(tmp_path, max_steps=2), train_dataset=random_dataset(8))
    with pytest.raises(RuntimeError, match=rf"in use by the run with pid {os.getppid()}"):
        trainer.train()
    assert trainer.state.global_step == 0 and json.loads(lock_file.read_text()) == holder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(json.dumps({**holder, "pid": dead.pid}))  # a killed run's lock
    seen = {}

    def step_and_look(*args, **kwargs):
        seen["holder"] = json.loads(lock_file.read_text())
        raise KeyboardInterrupt  # training fails mid-way: the lock is released all the same

    with mock.patch.object(Trainer, "training_step", side_effect=step_and_look), pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert seen["holder"]["pid"] == os.getpid() and not lock_file.exists()


# ----------------------------------------------------------------------------------------------------------------
# Training with HSPG
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 20-step OTO run of a tiny BERT classifier, shared by the tests that only read its results."""
    output_dir = tmp_path_factory.mktemp("oto_run")
    data = random_dataset(32)
    trainer = OTOTrainer(
        tiny_model("bert"),
        oto_args(
            output_dir,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            weight_decay=0.01,
            oto_mode="paper",
            oto_lambda=20.0,
            oto_max_group_sparsity=0.5,
        ),
        train_dataset=data,
        eval_dataset=data[:8],
    )
    trainer.train()
    return trainer


def test_hspg_gets_the_trainer_settings(trained):
    from hf_oto.optim import HSPG

    optimizer = trained.optimizer.optimizer if hasattr(trained.optimizer, "optimizer") else trained.optimizer
    assert isinstance(optimizer, HSPG)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    decay_names = set(trained.get_decay_parameter_names(trained.model))
    named = dict(trained.model.named_parameters())
    assert {id(named[n]) for n in decay_names} == {id(p) for p in decay["params"]}
    assert trained.oto_init_steps == 6
    # Warm-up then linear decay to zero: the scheduler drove HSPG's learning rate.
    assert trained.state.log_history[0]["learning_rate"] < 1e-2
    assert decay["lr"] == pytest.approx(0.0)


def test_sparsity_is_logged_at_every_logging_step(trained):
    train_logs = [entry for entry in trained.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == list(range(1, 21))
    for entry in train_logs:
        for key in OTO_KEYS:
            assert isinstance(entry[key], (int, float)), (key, entry)
        assert 0.0 <= entry["oto/group_sparsity"] <= 1.0
    stages = {entry["step"]: entry["oto/stage"] for entry in train_logs}
    assert all(stage == STAGE_IDS["initialization"] for step, stage in stages.items() if step < 6)
    assert all(stage == STAGE_IDS["half_space"] for step, stage in stages.items() if step > 6)
    last = train_logs[-1]
    assert 0 < last["oto/zero_groups"] <= 0.5 * len(trained.zigs)  # oto_max_group_sparsity=0.5
    assert last["oto/zero_groups"] == trained.zigs.num_zero_groups()
    assert last["oto/group_sparsity"] == pytest.approx(trained.zigs.group_sparsity())
    by_kind = trained.zigs.sparsity_by_kind()
    assert last["oto/group_sparsity_heads"] == pytest.approx(by_kind["heads"])
    assert last["oto/group_sparsity_ffn"] == pytest.approx(by_kind["ffn"])
    # No zero group before the half-space stage: the initialization stage only shrinks groups.
    assert all(entry["oto/zero_groups"] == 0 for entry in train_logs if entry["step"] < 6)


def test_sparsity_logs_without_optimizer_have_no_stage():
    logs = oto_sparsity_logs(build_zigs(tiny_model("bert"), families=("heads",)))
    assert logs == {"oto/group_sparsity": 0.0, "oto/group_sparsity_heads": 0.0, "oto/zero_groups": 0}


def test_callback_adds_metrics_to_a_plain_trainer(tmp_path):
    from hf_oto.optim import HSPG

    model = tiny_model("bert")
    zigs = build_zigs(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, logging_steps=1, **QUIET)
    trainer = Trainer(
        model, args, train_dataset=random_dataset(12), optimizers=(HSPG(model.parameters(), zigs, lr=1e-2), None)
    )
    OTOSparsityCallback.install(trainer, zigs)
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 3 and all(set(OTO_KEYS) <= set(entry) for entry in train_logs)


@pytest.mark.parametrize("mode", ["paper", "target"])
def test_resume_from_checkpoint_gives_identical_weights(tmp_path, mode):
    data = random_dataset(24)
    if mode == "paper":
        # Checkpoint at step 4, inside the initialization stage (6 of 12 steps from the fraction), so the resumed run
        # must restore both the step count and the moments of HSPG to switch stage at the same step.
        knobs = dict(oto_mode="paper", oto_lambda=3.0, oto_init_steps=None, oto_init_fraction=0.5)
    else:
        # Selections at steps 3, 5 and 7; the checkpoint at step 4 holds scores and a ramp in flight.
        knobs = dict(
            oto_mode="target", oto_lambda=None, oto_init_steps=3, oto_pruning_fraction=0.5, oto_pruning_periods=3,
            oto_cost_seq_length=16,
        )  # fmt: skip
    overrides = dict(max_steps=12, save_strategy="steps", save_steps=4, **knobs)
    full = OTOTrainer(tiny_model("bert"), oto_args(tmp_path / "full", **overrides), train_dataset=data)
    full.train()
    assert full.oto_init_steps == (6 if mode == "paper" else 3)
    assert full.zigs.num_zero_groups() > 0
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = OTOTrainer(tiny_model("bert", seed=1), oto_args(tmp_path / "resumed", **overrides), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 12
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
    assert resumed.zigs.num_zero_groups() == full.zigs.num_zero_groups()
    full_logs = {e["step"]: e for e in full.state.log_history if "loss" in e}
    resumed_logs = {e["step"]: e for e in resumed.state.log_history if "loss" in e}
    for step in range(5, 13):
        assert resumed_logs[step]["oto/stage"] == full_logs[step]["oto/stage"]
        assert resumed_logs[step]["oto/zero_groups"] == full_logs[step]["oto/zero_groups"]


def test_resume_from_a_plain_trainer_checkpoint_is_refused_until_its_optimizer_is_removed(tmp_path):
    """A plain `Trainer` checkpoint holds AdamW state: resuming OTO from it would train as plain AdamW (no penalty, no
    projection, no zero group). The error says to delete `optimizer.pt`; doing so resumes the weights with HSPG."""
    data = random_dataset(24)
    plain_args = TrainingArguments(
        **{**QUIET, "save_strategy": "steps"}, output_dir=str(tmp_path / "plain"), max_steps=4, save_steps=4,
        per_device_train_batch_size=4, learning_rate=1e-2, seed=0,
    )  # fmt: skip
    Trainer(tiny_model("bert"), plain_args, train_dataset=data).train()
    checkpoint = tmp_path / "plain" / "checkpoint-4"
    overrides = dict(max_steps=12, oto_lambda=3.0, oto_init_steps=4)
    trainer = OTOTrainer(tiny_model("bert", seed=1), oto_args(tmp_path / "oto", **overrides), train_dataset=data)
    with pytest.raises(ValueError, match=r"saved by torch.optim.AdamW, not HSPG.*delete `optimizer.pt`"):
        trainer.train(resume_from_checkpoint=str(checkpoint))

    os.remove(checkpoint / "optimizer.pt")
    trainer = OTOTrainer(tiny_model("bert", seed=1), oto_args(tmp_path / "oto", **overrides), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 12 and unwrap_optimizer(trainer.optimizer).step_count == 8
    assert trainer.zigs.num_zero_groups() > 0


def test_resume_with_other_groups_is_refused(tmp_path):
    """Resuming with another `oto_exclude` (or `oto_families`) must not restore the checkpoint's membership (which
    would zero the excluded layer): the state is refused, naming a parameter whose membership differs."""
    data = random_dataset(16)
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=4)
    OTOTrainer(tiny_model("bert"), oto_args(tmp_path / "full", **overrides), train_dataset=data).train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    args = oto_args(tmp_path / "resumed", **{**overrides, "max_steps": 8}, oto_exclude=["*.layer.0.*"])
    trainer = OTOTrainer(tiny_model("bert"), args, train_dataset=data)
    with pytest.raises(ValueError, match=r"other zero-invariant groups: 'bert.encoder.layer.0.attention.self.query"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ----------------------------------------------------------------------------------------------------------------
# Pruning, saving and pushing
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned(trained):
    pytest.importorskip("hf_oto.pruning")
    pytest.importorskip("hf_oto.modeling")
    sparse = copy.deepcopy(trained.model).eval()
    params_before = sum(p.numel() for p in trained.model.parameters())
    slim = trained.prune()
    return trained, sparse, slim, params_before


def test_prune_gives_the_same_outputs(pruned):
    trainer, sparse, slim, params_before = pruned
    assert trainer.is_pruned and trainer.pruning_report is not None and trainer.zigs is None
    assert trainer.model is slim
    assert sum(p.numel() for p in slim.parameters()) < params_before
    inputs = tiny_inputs(sparse, batch_size=3, seq_length=8)
    with torch.no_grad():
        torch.testing.assert_close(slim.eval()(**inputs).logits, sparse(**inputs).logits, rtol=0, atol=1e-4)
    assert trainer.prune() is slim  # a second call is a no-op
    metrics = trainer.evaluate()  # the slim model evaluates in the same trainer
    assert "eval_loss" in metrics and not any(key.startswith("oto/") for key in trainer.state.log_history[-1])
    with pytest.raises(RuntimeError, match="already pruned"):
        trainer.create_optimizer()


def test_save_pruned_model_reloads_identically(pruned, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hf_oto.modeling import load_pruned_model

    trainer, sparse, slim, _ = pruned
    trainer.evaluate()  # its metrics go to the card
    directory = trainer.save_pruned_model(str(tmp_path / "slim"))
    card = (tmp_path / "slim" / "README.md").read_text()
    assert "only-train-once" in card and "| oto_lambda | 20.0 |" in card
    assert "AutoModelForSequenceClassification" in card and "eval_loss" in card
    reloaded = load_pruned_model(directory, auto_class=AutoModelForSequenceClassification).eval()
    inputs = tiny_inputs(sparse, batch_size=3, seq_length=8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, slim.eval()(**inputs).logits, rtol=0, atol=0)


def test_a_registered_base_direction_trains_through_the_trainer(tmp_path, monkeypatch):
    """A base direction is one registered class: OTOTrainingArguments and OTOTrainer accept it by name."""
    from hf_oto.optim import directions

    class SlowAdamW(directions.AdamWDirection):
        name = "slow_adamw"

    monkeypatch.setitem(directions.DIRECTIONS, "slow_adamw", SlowAdamW)
    (parsed,) = HfArgumentParser(OTOTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--oto_variant", "slow_adamw"]
    )  # the command line of the scripts takes it too
    assert parsed.oto_variant == "slow_adamw"
    trainer = OTOTrainer(
        tiny_model("bert"),
        oto_args(tmp_path, max_steps=8, oto_variant="slow_adamw", oto_lambda=20.0, oto_init_steps=2),
        train_dataset=random_dataset(16),
    )
    trainer.train()
    assert trainer.optimizer.param_groups[0]["variant"] == "slow_adamw" and trainer.zigs.num_zero_groups() > 0
    monkeypatch.delitem(directions.DIRECTIONS, "slow_adamw")
    with pytest.raises(ValueError, match="oto_variant must be one of.*register_direction"):
        oto_args(tmp_path, oto_variant="slow_adamw")


def test_finish_prunes_measures_evaluates_and_saves_once(tmp_path):
    """`trainer.finish()` is the scripts' finishing step: the results, the card and the folder agree."""
    data = random_dataset(32)
    trainer = OTOTrainer(
        tiny_model("bert"),
        oto_args(tmp_path / "run", oto_lambda=20.0, oto_max_group_sparsity=0.5),
        train_dataset=data,
        eval_dataset=data[:8],
    )
    trainer.train()
    results = trainer.finish(results={"note": "kept"})
    report = trainer.pruning_report
    assert trainer.is_pruned and results["note"] == "kept" and results["zero_groups"] > 0
    assert results["flops"] == report.flops_after < results["dense_flops"] == report.flops_before
    assert results["pruned_model_dir"] == "pruned" and "eval_loss" in results
    saved = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert saved["eval_loss"] == results["eval_loss"] and saved["flops_ratio"] == report.flops_ratio
    card = (tmp_path / "run" / "pruned" / "README.md").read_text()
    assert "eval_loss" in card and f"{report.params_after:,}" in card
    assert (tmp_path / "run" / "pruned" / "config.json").is_file()
    with pytest.raises(ValueError, match="already pruned"):
        trainer.finish()


def test_save_pruned_model_before_pruning_is_an_error(tmp_path):
    trainer = OTOTrainer(tiny_model("bert"), oto_args(tmp_path))
    with pytest.raises(ValueError, match="call `trainer.prune\\(\\)`"):
        trainer.save_pruned_model(str(tmp_path / "slim"))


def test_push_to_hub_uploads_the_slim_folder_once(pruned, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from hf_oto.modeling import load_pruned_model

    from .hub_mock import mock_hub

    trainer, _, slim, params_before = pruned
    # A dense sharded save left in the output folder must not be uploaded.
    output_dir = trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": {"classifier.bias": "model-00001-of-00002.safetensors"}}, handle)
    folder = tmp_path / "slim"
    trainer.save_pruned_model(str(folder))
    with mock_hub() as hub:
        trainer.push_to_hub(commit_message="slim", license="apache-2.0")
    assert [created["repo_id"] for created in hub.created] == [f"me/{os.path.basename(output_dir)}"]
    assert hub.created[0]["exist_ok"] is True
    (upload,) = hub.uploads
    assert upload["folder"] == str(folder.absolute()) and upload["commit_message"] == "slim"
    assert upload["files"] == ["README.md", "config.json", "model.safetensors", "oto_layout.png"]
    assert f'load_pruned_model("me/{os.path.basename(output_dir)}"' in upload["card"]
    assert "license: apache-2.0" in upload["card"] and "only-train-once" in upload["card"]
    reloaded = load_pruned_model(folder, auto_class=AutoModelForSequenceClassification)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in slim.parameters()) < params_before


def test_push_to_hub_never_pushes_dense_checkpoints_unless_asked(tmp_path):
    from .hub_mock import mock_hub, mock_trainer_hub

    data = random_dataset(16)
    with mock_hub() as hub:
        args = oto_args(
            tmp_path / "out", max_steps=4, save_strategy="steps", save_steps=2, push_to_hub=True,
            hub_model_id="me/tiny-oto", hub_private_repo=True,
        )  # fmt: skip
        trainer = OTOTrainer(tiny_model("bert"), args, train_dataset=data, eval_dataset=data[:4])
        trainer.train()
        trainer.save_model()  # the dense model, in output_dir: not pushed either
        with pytest.raises(ValueError, match=r"call `trainer.prune\(\)` first"):
            trainer.push_to_hub()
        assert hub.created == [] and hub.uploads == []
        trainer.prune()
        trainer.push_to_hub()
    (upload,) = hub.uploads
    assert hub.created == [{"repo_id": "me/tiny-oto", "private": True, "exist_ok": True, "repo_type": "model"}]
    assert upload["folder"] == str((tmp_path / "out" / "pruned").absolute())
    assert not any(name.startswith(("checkpoint-", "runs/", "_")) for name in upload["files"])
    assert "model.safetensors" in upload["files"] and "training_args.bin" not in upload["files"]

    # Opting in: the Trainer's own save-time pushes (its create_repo / upload_folder) run.
    with mock_trainer_hub("me/tiny-oto") as (create_repo, upload_folder):
        args = oto_args(
            tmp_path / "opt-in", max_steps=2, save_strategy="steps", save_steps=2, push_to_hub=True,
            hub_model_id="me/tiny-oto", oto_push_checkpoints=True,
        )  # fmt: skip
        OTOTrainer(tiny_model("bert"), args, train_dataset=data).train()
        create_repo.assert_called_once()
        assert upload_folder.call_count >= 1
        # Without push_to_hub, push_to_hub() before pruning creates the repo then (transformers 5 passes `private`).
        late = oto_args(tmp_path / "opt-in-late", max_steps=1, hub_model_id="me/tiny-oto", oto_push_checkpoints=True)
        OTOTrainer(tiny_model("bert"), late, train_dataset=data).push_to_hub()
        assert create_repo.call_count == 2


def test_default_target_mode_reaches_half_the_flops_and_logs_it(tmp_path):
    """With no oto_* knob, OTOTrainer prunes to the default target: 50% of the FLOPs, counted as the report counts."""
    args = OTOTrainingArguments(**{**QUIET, "output_dir": str(tmp_path), "max_steps": 12, "learning_rate": 1e-2,
                                   "per_device_train_batch_size": 4, "logging_steps": 4, "seed": 0})  # fmt: skip
    assert args.oto_mode == "target" and args.oto_pruning_target().flops == 0.5
    trainer = OTOTrainer(tiny_model("bert"), args, train_dataset=random_dataset(24), eval_dataset=random_dataset(8))
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "oto/flops_kept" in entry][-1]
    assert 0.4 < last["oto/flops_kept"] <= 0.5
    trainer.prune()
    report = trainer.pruning_report
    assert report.flops_after / report.flops_before == pytest.approx(last["oto/flops_kept"])


def test_target_mode_log_names_the_token_length_only_for_models_that_take_tokens(tmp_path, caplog):
    import logging

    from .tiny_convnets import tiny_vgg

    caplog.set_level(logging.INFO, logger="hf_oto.trainer")
    for name, model in (("bert", tiny_model("bert")), ("vgg", tiny_vgg())):
        caplog.clear()
        args = OTOTrainingArguments(**{**QUIET, "output_dir": str(tmp_path / name), "max_steps": 20})
        OTOTrainer(model, args).create_optimizer()
        (message,) = [record.getMessage() for record in caplog.records if "HSPG target mode" in record.getMessage()]
        assert ("at 128 tokens" in message) == (name == "bert"), message


def test_a_mean_loss_head_is_divided_by_the_accumulation_steps(tmp_path):
    """transformers 5 gives every forward `**kwargs`; the Trainer then takes the loss as normalised by
    `num_items_in_batch` (no division by the accumulation steps, a product by the processes under DDP). A head whose
    loss is a mean that drops the argument (BertForSequenceClassification) is trained as transformers 4 trained it;
    a causal LM, whose loss uses it, keeps the Trainer's token-weighted loss."""
    from hf_oto.trainer import loss_uses_num_items_in_batch

    assert not loss_uses_num_items_in_batch(tiny_model("bert")) and loss_uses_num_items_in_batch(tiny_model("llama"))
    data = random_dataset(8)
    bert = OTOTrainer(tiny_model("bert"), oto_args(tmp_path / "bert"), train_dataset=data)
    assert bert.model_accepts_loss_kwargs is False
    llama = OTOTrainer(tiny_model("llama"), oto_args(tmp_path / "llama"), train_dataset=data)
    assert llama.model_accepts_loss_kwargs is True

    # Two accumulated half batches give the gradient of the whole batch, as in transformers 4.
    def first_step_gradient(accumulation: int) -> torch.Tensor:
        args = oto_args(
            tmp_path / f"ga{accumulation}", max_steps=1, per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation, max_grad_norm=0.0, seed=0,
        )  # fmt: skip
        trainer = OTOTrainer(tiny_model("bert"), args, train_dataset=data)
        grads = {}
        trainer.add_callback(_GradientGrabber(grads))
        trainer.train()
        return grads["classifier.weight"]

    torch.testing.assert_close(first_step_gradient(2), first_step_gradient(1), atol=1e-6, rtol=1e-4)


class _GradientGrabber(TrainerCallback):
    def __init__(self, grads: dict):
        self.grads = grads

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
