"""All-reduce and all-gather for CPU ranks on one host through a shared-memory segment.

Why: a gloo collective costs tens of microseconds of socket round trips even for a few kilobytes, which
dominates a decode step of a small model. Ranks on one host can instead write their message into a mapped
file and read each other's, paying one memory copy and a flag handshake.

Segment layout (one file, mapped by every rank, all offsets 64-byte aligned):

    header   64 bytes                 magic, world size, slot size
    flags    world x 64 bytes         per rank: arrived sequence number (+0), left marker (+8)
    data     2 x world x slot bytes   double buffer: collective `seq` uses buffer `seq % 2`

Protocol for collective number `seq` (every rank issues the same collectives in the same order):
write the message into your slot of buffer `seq % 2`, publish `seq` in your flag, wait until every flag is
at least `seq`, read. One handshake per collective is enough because of the double buffer: a rank can only
reach `seq + 2` (and overwrite buffer `seq % 2`) after every peer published `seq + 1`, which each does after
it finished reading `seq`. Publication relies on stores becoming visible in program order (x86-64 TSO).

Waiting spins, then yields the core, then sleeps briefly, and gives up after `timeout_s` with an error that
names the missing ranks, so a dead or diverged peer raises instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

_MAGIC = 0x6772617068636170  # "graphcap"
_LINE = 64
_INTS_PER_LINE = _LINE // 8
_BUSY_SPINS = 64
_YIELD_SPINS = 4096
_SLEEP_S = 50e-6


class ShmTimeoutError(TimeoutError):
    """A peer did not reach a shared-memory collective in time (dead, hung, or issuing other collectives)."""


class ShmPeerError(RuntimeError):
    """A peer closed its communicator while this rank was still waiting for it."""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class ShmCommunicator:
    """Shared-memory collectives among `world_size` processes on one host.

    Rank 0 constructs with `create=True`; the others attach to the same `path` afterwards. Once everyone has
    attached, `unlink()` removes the file name so the memory is returned by the kernel when the last rank
    unmaps it, even if a rank is killed. Collectives are only taken while inside `capture()` or `replay()`;
    the coordinator sends everything else to torch.distributed.
    """

    name = "shm"

    def __init__(
        self, path: str, rank: int, world_size: int, max_bytes: int, timeout_s: float, create: bool
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        self.path = path
        self.rank = rank
        self.world_size = world_size
        self.max_bytes = _round_up(max_bytes, _LINE)
        self.timeout_s = timeout_s
        self.active = False
        self._seq = 0
        self._flags_offset = _LINE
        self._data_offset = _LINE + world_size * _LINE
        size = self._data_offset + 2 * world_size * self.max_bytes
        if create:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        else:
            fd = os.open(path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size != size:
                    raise ValueError(f"shared-memory segment {path} has the wrong size for this group")
                self._mmap = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        self._words = memoryview(self._mmap).cast("q")
        header = (_MAGIC, world_size, self.max_bytes)
        if create:
            for i, value in enumerate(header):
                self._words[i] = value
        elif tuple(self._words[0:3]) != header:
            raise ValueError(f"shared-memory segment {path} was created for another group layout")
        raw = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._data = raw[self._data_offset :].view(2, world_size, self.max_bytes)
        self._data[:, rank].zero_()  # fault in this rank's slots now, not in the first in-graph collective

    @property
    def closed(self) -> bool:
        return self._mmap.closed

    def rejection_reason(self, x: torch.Tensor) -> str | None:
        """Why `x` cannot go through shared memory (a stats key), or None when it can."""
        if x.device.type != "cpu":
            return "not_cpu"
        if x.numel() * x.element_size() > self.max_bytes:
            return "message_too_large"
        return None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Switch collectives to shared memory for the duration of the context.

        The workspace (sized for the largest message at construction, already faulted in) needs no work
        here; what capture adds is a handshake: a rank that never enters capture is reported on entry, as a
        timeout naming it, instead of as a hang inside a captured graph.
        """
        self._handshake("enter graph capture")
        with self.replay():
            yield

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Switch collectives to shared memory without the capture handshake: on CPU a "captured graph" is
        a compiled callable whose collectives run again at every replay, and should take the path they
        were captured and verified with, at no extra synchronisation."""
        previous, self.active = self.active, True
        try:
            yield
        finally:
            self.active = previous

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum in rank order on every rank, so all ranks get bitwise identical results."""
        slots = self._exchange(x, "all_reduce")
        out = torch.add(slots[0], slots[1]) if self.world_size > 1 else slots[0].clone()
        for slot in slots[2:]:
            out.add_(slot)
        return out

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._exchange(x, "all_gather"), dim=dim)

    def unlink(self) -> None:
        """Remove the file name; mappings stay valid and the memory goes when the last one is closed."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Tell peers this rank left (so a waiting peer fails at once), then unmap."""
        if self.closed:
            return
        self._words[self._flag_index(self.rank) + 1] = 1
        self._words.release()
        del self._data
        try:
            self._mmap.close()
        except BufferError:
            logger.debug("a view of %s is still alive; the mapping goes when it is collected", self.path)

    def _exchange(self, x: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Publish `x` and return every rank's copy as views of the segment (valid until the next-but-one
        collective)."""
        self._seq += 1
        nbytes = x.numel() * x.element_size()
        buf = self._data[self._seq % 2]
        buf[self.rank, :nbytes].view(x.dtype).view(x.shape).copy_(x)
        self._publish_and_wait(what)
        return [buf[r, :nbytes].view(x.dtype).view(x.shape) for r in range(self.world_size)]

    def _handshake(self, what: str) -> None:
        self._seq += 1
        self._publish_and_wait(what)

    def _flag_index(self, rank: int) -> int:
        return self._flags_offset // 8 + rank * _INTS_PER_LINE

    def _publish_and_wait(self, what: str) -> None:
        seq = self._seq
        words = self._words
        words[self._flag_index(self.rank)] = seq
        spins = 0
        deadline = 0.0
        while True:
            missing = [r for r in range(self.world_size) if words[self._flag_index(r)] < seq]
            if not missing:
                return
            spins += 1
            if spins <= _BUSY_SPINS:
                continue
            left = [r for r in missing if words[self._flag_index(r) + 1]]
            if left:
                raise ShmPeerError(f"shared-memory {what} #{seq}: rank(s) {left} closed their communicator")
            now = time.monotonic()
            if deadline == 0.0:
                deadline = now + self.timeout_s
            elif now > deadline:
                raise ShmTimeoutError(
                    f"shared-memory {what} #{seq} on rank {self.rank}: rank(s) {missing} did not arrive within "
                    f"{self.timeout_s:g}s (a peer died, hangs, or issued different collectives)"
                )
            if spins <= _YIELD_SPINS:
                os.sched_yield()
            else:
                time.sleep(_SLEEP_S)
