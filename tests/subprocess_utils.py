"""Helpers of the tests that start training processes: the environment they run in and a free TCP port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on now (for the rendezvous of launched processes)."""
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The environment of started processes: this checkout first on the path, no hub, one intra-op thread each (the
    same in every process, so that their CPU kernels sum in the same order)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    # gloo on the loopback interface: the rendezvous never depends on how the host name resolves.
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME="lo")
    return env


def run_launcher(command: list[str], timeout: float) -> None:
    """Runs a launcher (`torchrun`, `accelerate launch`) in a session of its own; fails the test with the end of its
    stderr if it exits with an error or outlives `timeout` (then the launcher and the processes it started are
    killed, by their process group)."""
    process = subprocess.Popen(
        command, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:5])} ... still running after {timeout} s:\n{stderr.decode()[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command[:5])} ... exited with {process.returncode}:\n{stderr.decode()[-4000:]}")
