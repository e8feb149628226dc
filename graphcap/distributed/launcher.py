"""Starting N ranks on this host and supervising them from the API process.

Each rank is a spawned process with a command pipe. The supervisor waits on the pipes and on the
processes' sentinels together, so a rank that raises or dies ends the run with a clear error within a
bounded time instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import socket
import time
from typing import Any, Callable

from graphcap.errors import UserError


class RankFailure(RuntimeError):
    """A tensor-parallel rank raised or died; the whole group has been stopped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    def __init__(self, world_size: int, target: Callable[..., None], args: tuple) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.port = free_port()
        self.conns = []
        self.procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(rank, world_size, self.port, child, *args), daemon=True,
                               name=f"graphcap-rank{rank}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def broadcast(self, message: tuple) -> None:
        self.scatter([message] * self.world_size)

    def scatter(self, messages: list[tuple]) -> None:
        """Message i to rank i (data-parallel work: each rank its own share)."""
        if not self.conns:
            raise RankFailure("the tensor-parallel ranks were stopped (after a failure or shutdown); "
                              "create a new engine")
        for rank, (conn, message) in enumerate(zip(self.conns, messages)):
            try:
                conn.send(message)
            except (BrokenPipeError, OSError):
                self.stop()
                raise RankFailure(f"rank {rank} is gone (exit code {self.procs[rank].exitcode})") from None

    def gather(self, timeout_s: float) -> list[Any]:
        """One reply per rank. A rank's ('error', kind, text) reply or death stops the group and raises."""
        replies: list[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout_s
        while pending:
            waitables = [self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending]
            ready = mp.connection.wait(waitables, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.stop()
                raise RankFailure(f"ranks {sorted(pending)} did not answer within {timeout_s:.0f} s")
            for rank in sorted(pending):
                conn, proc = self.conns[rank], self.procs[rank]
                if conn in ready or (proc.sentinel in ready and conn.poll()):
                    try:
                        reply = conn.recv()
                    except (EOFError, OSError):  # the rank died mid-message or its end of the pipe reset
                        reply = ("error", "internal", f"exited with code {proc.exitcode}")
                    if reply[0] == "error":
                        self.stop()
                        if reply[1] == "user":
                            raise UserError(reply[2])
                        raise RankFailure(f"rank {rank} failed: {reply[2]}")
                    replies[rank] = reply[1]
                    pending.discard(rank)
                elif proc.sentinel in ready:
                    self.stop()
                    raise RankFailure(f"rank {rank} died (exit code {proc.exitcode})")
        return replies

    def stop(self, grace_s: float = 5.0) -> None:
        for conn in self.conns:
            try:
                conn.send(("shutdown",))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for conn in self.conns:
            conn.close()
        self.conns = []
