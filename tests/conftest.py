"""Fixtures shared by the tests that train in the test process next to launched processes."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState


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
