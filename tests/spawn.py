"""Spawned processes on one machine, for the distributed (gloo) tests."""

import socket
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(target: Callable[[int, int, str], None], out_dir: str, world: int, timeout_s: float) -> None:
    """Run ``target(rank, port, out_dir)`` on ``world`` spawned processes; fail the test after ``timeout_s``."""
    context = mp.start_processes(target, args=(free_port(), out_dir), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {world} ranks did not finish within {timeout_s:.0f} s")
