"""Fixtures shared by the tests that train in the test process next to launched processes."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers.utils import logging as transformers_logging


SESSION_VERBOSITY = transformers_logging.get_verbosity()
"""The `transformers` verbosity when the test session starts."""


@pytest.fixture(autouse=True)
def restore_transformers_verbosity():
    """A `Trainer` applies its `log_level` to the whole `transformers` logger (the trainer tests pass `"error"`):
    every test starts from, and leaves, the verbosity of the session's start — not the one it finds, which a
    module-scoped fixture that built a `Trainer` may have changed — so tests that read transformers' warnings do not
    depend on the order the tests run in."""
    transformers_logging.set_verbosity(SESSION_VERBOSITY)
    yield
    transformers_logging.set_verbosity(SESSION_VERBOSITY)


@pytest.fixture
def one_thread():
    """One intra-op thread in the test process, as in the processes the tests start (`launch_env`): in-process
    reference runs sum in their order, and tiny models do not wait on thread barriers on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons (e.g. the mixed precision of the first `Accelerator`):
    start and leave the test without one."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (see `setup.cfg`) run only with `RUN_SLOW=1`."""
    if os.environ.get("RUN_SLOW", "0").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow test: run with RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
