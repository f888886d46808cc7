"""Models and paths that are not what hf_oto assumes: non-finite outputs at the pruning check, missing local folders
given to `load_pruned_model` (the README table "Bad input: what each misuse gives" links here)."""

from __future__ import annotations

import pytest
import torch

import hf_oto.pruning
from hf_oto import build_zigs
from hf_oto.trainer import prune_and_check

from .tiny_models import tiny_inputs, tiny_model


def _sparse_bert():
    model = tiny_model("bert")
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    return model, zigs


def test_nan_outputs_fail_the_pruning_check(monkeypatch):
    model, zigs = _sparse_bert()
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    with pytest.raises(RuntimeError, match=r"group-sparse model holds 2 NaN or infinite values.*diverged"):
        prune_and_check(model, zigs, tiny_inputs(model), seq_length=16)

    model, zigs = _sparse_bert()
    prune = hf_oto.pruning.prune_zero_groups

    def prune_into_nan(*args, **kwargs):
        slim, report = prune(*args, **kwargs)
        with torch.no_grad():
            slim.classifier.bias[0] = float("inf")
        return slim, report

    monkeypatch.setattr(hf_oto.pruning, "prune_zero_groups", prune_into_nan)
    with pytest.raises(RuntimeError, match=r"pruned model holds 2 NaN or infinite values.*not exact"):
        prune_and_check(model, zigs, tiny_inputs(model), seq_length=16)
