"""HSPG's state never changes what is optimized, and no setting gives silently wrong numbers: resuming only from HSPG
state of the same groups, finite hyper-parameters, float16 / bfloat16 parameters, frozen parameters."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from hf_oto import build_zigs
from hf_oto.optim import HSPG, PruningTarget
from hf_oto.training_args import OTOTrainingArguments
from tests.test_hspg import SETTINGS, lm_loss, single_thread, train, trainer_param_groups  # noqa: F401 (autouse)
from tests.test_hspg_target import target_hspg
from tests.tiny_models import tiny_model


@pytest.fixture
def hspg_warnings(caplog):
    """The warnings of `hf_oto.optim.hspg` so far."""
    caplog.set_level(logging.WARNING, logger="hf_oto.optim.hspg")
    return lambda: [
        record.getMessage()
        for record in caplog.records
        if record.name == "hf_oto.optim.hspg" and record.levelno >= logging.WARNING
    ]


def finite(model: torch.nn.Module) -> bool:
    return all(bool(param.isfinite().all()) for param in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Non-finite hyper-parameters
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["lr", "lmbda", "epsilon", "momentum", "eps", "weight_decay", "betas"])
def test_non_finite_hyperparameters_are_refused(name, bad):
    model = tiny_model("bert")
    zigs = build_zigs(model)
    value = (0.9, bad) if name == "betas" else bad
    label = "betas[1]" if name == "betas" else name
    with pytest.raises(ValueError, match=rf"{re_escape(label)} must be a finite number; got"):
        HSPG(model.parameters(), zigs, **{name: value})
    with pytest.raises(ValueError, match=rf"{re_escape(label)} \(param group 0\) must be a finite number"):
        HSPG([{"params": list(model.parameters()), name: value}], zigs)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_target_mode_knobs_are_refused(bad):
    model = tiny_model("bert")
    for kwargs in (dict(flops=bad), dict(params=bad), dict(max_kind_sparsity={"heads": bad})):
        with pytest.raises(ValueError, match="must be a fraction"):
            PruningTarget(**kwargs)
    with pytest.raises(ValueError, match="max_family_sparsity must be in"):
        target_hspg(model, max_family_sparsity=bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize(
    "name, mode",
    [
        ("oto_lambda", "paper"),
        ("oto_epsilon", "paper"),
        ("oto_init_fraction", "paper"),
        ("oto_momentum", "paper"),
        ("oto_max_group_sparsity", "paper"),
        ("oto_max_family_sparsity", "paper"),
        ("oto_target_flops", "target"),
        ("oto_target_params", "target"),
        ("oto_pruning_fraction", "target"),
    ],
)
def test_non_finite_oto_arguments_are_refused(tmp_path, name, mode, bad):
    with pytest.raises(ValueError, match=name.replace("oto_target_", "")):
        OTOTrainingArguments(output_dir=str(tmp_path), oto_mode=mode, report_to="none", use_cpu=True, **{name: bad})


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_a_non_finite_lr_set_later_is_refused_by_step(variant):
    model = tiny_model("bert")
    optimizer = HSPG(trainer_param_groups(model, 0.01), build_zigs(model), **SETTINGS[variant])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 2 else math.nan)
    for step in range(2):
        optimizer.zero_grad()
        lm_loss(model, seed=step).backward()
        optimizer.step()
        scheduler.step()
    before = copy.deepcopy(model.state_dict())
    optimizer.zero_grad()
    lm_loss(model, seed=2).backward()
    with pytest.raises(
        ValueError, match="lr of param group 0 at step 2 .nothing was updated. must be a finite number"
    ):
        optimizer.step()
    assert optimizer.step_count == 2
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
