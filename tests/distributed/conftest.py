"""Run a test function on N CPU ranks, each in its own process, and collect what each rank returned.

Each rank is a fresh interpreter that loads the test's module from its file (so no import name has to
resolve in the child) and calls `fn(rank, world_size, *args)` with the variables torchrun would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A rank that raises reports its error; a rank that
dies or outlives the deadline fails the test, and every rank is killed: nothing is left hanging.
"""

from __future__ import annotations

import inspect
import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

_CHILD = r"""
import importlib.util, os, pickle, sys, traceback
module_path, fn_name, result_path, args_path = sys.argv[1:5]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
try:
    spec = importlib.util.spec_from_file_location(f"_rank_module_{os.getpid()}", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(args_path, "rb") as f:
        args = pickle.load(f)
    outcome = ("ok", getattr(module, fn_name)(rank, world, *args))
except BaseException as exc:
    outcome = ("error", (type(exc).__name__, str(exc), traceback.format_exc()))
with open(result_path + ".tmp", "wb") as f:
    pickle.dump(outcome, f)
os.replace(result_path + ".tmp", result_path)
"""


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    fn: Callable[..., Any], world_size: int, tmp_path: Path, args: tuple = (), timeout_s: float = 120.0
) -> list[RankResult]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; results in rank order."""
    module_path = inspect.getfile(fn)
    args_path = tmp_path / "args.pkl"
    args_path.write_bytes(pickle.dumps(args))
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        result_path = tmp_path / f"rank{rank}.pkl"
        log_path = tmp_path / f"rank{rank}.log"
        cmd = [sys.executable, "-c", _CHILD, module_path, fn.__name__, str(result_path), str(args_path)]
        with open(log_path, "wb") as log:
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), result_path, log_path))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p, _, _ in procs):
            for rank, (p, result_path, log_path) in enumerate(procs):
                if p.poll() is not None and not result_path.exists():
                    log = log_path.read_text(errors="replace")[-4000:]
                    pytest.fail(f"rank {rank} died (exit code {p.returncode}) without reporting:\n{log}")
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {timeout_s}s (hang)")
            time.sleep(0.05)
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for rank, (p, result_path, log_path) in enumerate(procs):
        if not result_path.exists():
            log = log_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"rank {rank} died (exit code {p.returncode}) without reporting:\n{log}")
        status, payload = pickle.loads(result_path.read_bytes())
        if status == "ok":
            results.append(RankResult(rank, value=payload))
        else:
            results.append(RankResult(rank, error_type=payload[0], error=payload[1], traceback=payload[2]))
    return results


@pytest.fixture
def spawn_ranks(tmp_path: Path) -> Callable[..., list[Any]]:
    """Run `fn` on N ranks and return each rank's value; any rank's error fails the test with its traceback."""

    def spawn(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout_s: float = 120.0) -> list[Any]:
        results = run_ranks(fn, world_size, tmp_path, args, timeout_s)
        for r in results:
            if not r.ok:
                pytest.fail(f"rank {r.rank} raised {r.error_type}: {r.error}\n{r.traceback}")
        return [r.value for r in results]

    return spawn


@pytest.fixture
def spawn_ranks_raw(tmp_path: Path) -> Callable[..., list[RankResult]]:
    """Like `spawn_ranks` but returns each rank's `RankResult`, for tests that expect a rank to fail."""

    def spawn(
        fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout_s: float = 120.0
    ) -> list[RankResult]:
        return run_ranks(fn, world_size, tmp_path, args, timeout_s)

    return spawn
