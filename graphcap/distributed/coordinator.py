"""The capture-aware group coordinator, and process-group setup and teardown.

A `GroupCoordinator` is one process group plus the communicators that serve it. Layers never pick a
communicator: they call `all_reduce` / `all_gather`, which go through the `graphcap::` custom ops (so
`torch.compile` traces them as single opaque nodes), and the op calls back into `all_reduce_impl` /
`all_gather_impl` at run time, where the coordinator picks a path. Inside `graph_capture()` every
communicator has entered its own `capture()`, so the shared-memory path serves what captured graphs issue;
`graph_replay()` keeps that path for CPU graphs, which call the ops again at every replay. Elsewhere the
eager torch.distributed path serves, and everything the fast path refuses falls back to it, counted with a
reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from graphcap.distributed import ops, parallel_state
from graphcap.distributed.communicators import Communicator, ShmCommunicator, TorchDistCommunicator

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_SHM_MAX_BYTES = 8 << 20
TP_GROUP_NAME = "tp"


@dataclass
class GraphCaptureContext:
    """What a capture runs on: the CUDA stream to capture on, or None on CPU."""

    stream: torch.cuda.Stream | None


class GroupCoordinator:
    """A process group over `ranks` and its communicators. Construct it on every rank of the world
    (creating a process group is collective); this rank must be one of `ranks`."""

    def __init__(
        self,
        ranks: list[int],
        local_rank: int,
        backend: str,
        group_name: str,
        use_shm: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        shm_max_bytes: int = DEFAULT_SHM_MAX_BYTES,
    ) -> None:
        timeout = timedelta(seconds=timeout_s)
        self.ranks = list(ranks)
        self.group_name = group_name
        self.local_rank = local_rank
        self.backend = backend
        self.timeout_s = timeout_s
        self.device_group = dist.new_group(self.ranks, backend=backend, timeout=timeout)
        self.cpu_group = (
            self.device_group if backend == "gloo" else dist.new_group(self.ranks, backend="gloo", timeout=timeout)
        )
        global_rank = dist.get_rank()
        if global_rank not in self.ranks:
            raise ValueError(f"rank {global_rank} is not in group {group_name!r} {self.ranks}")
        self.rank_in_group = self.ranks.index(global_rank)
        self.world_size = len(self.ranks)
        self.device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        self.torch_dist = TorchDistCommunicator(self.device_group, self.world_size)
        self.shm = self._create_shm(shm_max_bytes) if use_shm and self._shm_possible() else None
        self.communicators: list[Communicator] = [c for c in (self.shm, self.torch_dist) if c is not None]
        self._capture_depth = 0
        self._paths: Counter[str] = Counter()
        self._fallbacks: Counter[str] = Counter()

    @property
    def is_capturing(self) -> bool:
        return self._capture_depth > 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group through the `graphcap::all_reduce` custom op, traceable by torch.compile."""
        return ops.all_reduce(x, self.group_name)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` through the `graphcap::all_gather` custom op."""
        return ops.all_gather(x, dim % x.dim(), self.group_name)

    def all_reduce_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self._pick(x).all_reduce(x)

    def all_gather_impl(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self._pick(x).all_gather(x, dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `x` on every rank with rank `src`'s (a rank within this group) in place."""
        dist.broadcast(x, src=self.ranks[src], group=self.device_group)
        return x

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)

    def stats(self) -> dict[str, object]:
        """Collectives served per path, and fallbacks from the fast path by reason."""
        counts: dict[str, object] = {c.name: self._paths[c.name] for c in self.communicators}
        counts["fallbacks"] = dict(self._fallbacks)
        return counts

    @contextlib.contextmanager
    def capture_communicators(self) -> Iterator[None]:
        """Enter every communicator's `capture()` and mark this group as capturing. Re-entrant: only the
        outermost entry prepares the communicators. The plugin uses this alone, since the host framework
        manages its own capture stream."""
        with contextlib.ExitStack() as stack:
            if not self._capture_depth:
                for communicator in self.communicators:
                    stack.enter_context(communicator.capture())
            self._capture_depth += 1
            try:
                yield
            finally:
                self._capture_depth -= 1

    @contextlib.contextmanager
    def graph_capture(
        self, graph_capture_context: GraphCaptureContext | None = None
    ) -> Iterator[GraphCaptureContext]:
        """The context graph runners capture in: on CUDA, work moves to a side stream (capture cannot run on
        the default stream) that first waits for pending work; on any device, communicators are prepared."""
        if graph_capture_context is None:
            stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
            graph_capture_context = GraphCaptureContext(stream)
        stream = graph_capture_context.stream
        with contextlib.ExitStack() as stack:
            if stream is not None:
                current = torch.cuda.current_stream(stream.device)
                if current != stream:
                    stream.wait_stream(current)
                stack.enter_context(torch.cuda.stream(stream))
            stack.enter_context(self.capture_communicators())
            yield graph_capture_context

    @contextlib.contextmanager
    def graph_replay(self) -> Iterator[None]:
        """The context to run captured graphs in. A CUDA graph replays its kernels without Python, so this
        costs nothing there; a CPU graph (a compiled callable) calls the collective ops again, and inside
        this context they take the path they were captured with (shared memory) instead of the eager one."""
        with contextlib.ExitStack() as stack:
            for communicator in self.communicators:
                stack.enter_context(communicator.replay())
            yield

    def destroy(self) -> None:
        """Close every communicator (unmapping shared memory). The process groups themselves go with
        `destroy_distributed`, which tears down the whole world."""
        for communicator in self.communicators:
            communicator.close()
        self.communicators = []
        self.shm = None

    def _pick(self, x: torch.Tensor) -> Communicator:
        shm = self.shm
        chosen: Communicator = self.torch_dist
        if shm is not None and shm.active:
            reason = shm.rejection_reason(x)
            if reason is None:
                chosen = shm
            else:
                self._fallbacks[reason] += 1
        self._paths[chosen.name] += 1
        return chosen

    def _shm_possible(self) -> bool:
        """Shared memory needs CPU tensors, more than one rank, and every rank on this host."""
        if self.device.type != "cpu" or self.world_size == 1:
            return False
        hosts: list[str | None] = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=self.cpu_group)
        return len(set(hosts)) == 1

    def _create_shm(self, max_bytes: int) -> ShmCommunicator:
        """Rank 0 creates the segment under a name unique to this run, the others attach, then the name is
        removed so a killed process can never leak the memory."""
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(shm_dir, f"graphcap-{self.group_name}-{os.getpid()}-{uuid.uuid4().hex}")
        path = str(self.broadcast_object(path))
        leader = self.rank_in_group == 0
        rank, world, timeout = self.rank_in_group, self.world_size, self.timeout_s
        try:
            shm = ShmCommunicator(path, rank, world, max_bytes, timeout, create=True) if leader else None
            self.barrier()
            if shm is None:
                shm = ShmCommunicator(path, rank, world, max_bytes, timeout, create=False)
            self.barrier()
        finally:
            if leader:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return shm


def init_distributed(
    world_size: int | None = None,
    rank: int | None = None,
    backend: str | None = None,
    init_method: str | None = None,
    local_rank: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    use_shm: bool = True,
    shm_max_bytes: int = DEFAULT_SHM_MAX_BYTES,
) -> GroupCoordinator:
    """Join the world and install the tensor-parallel coordinator (over all ranks) for layers to use.

    Arguments left out come from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT), so the same call works under torchrun on many hosts and under graphcap's own launcher.
    `timeout_s` bounds every collective, so a dead peer raises instead of hanging.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if init_method is None:
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            init_method = "env://"
        elif world_size == 1:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            raise ValueError("init_distributed needs init_method or MASTER_ADDR and MASTER_PORT for several ranks")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():  # a host or launcher may have joined the world already
        dist.init_process_group(
            backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timedelta(seconds=timeout_s)
        )
    coordinator = GroupCoordinator(
        list(range(dist.get_world_size())), local_rank, backend, TP_GROUP_NAME, use_shm, timeout_s, shm_max_bytes
    )
    ops.register_group(coordinator.group_name, coordinator)
    parallel_state.set_tp_group(coordinator)
    names = [c.name for c in coordinator.communicators]
    logger.info("rank %d/%d joined (%s); communicators: %s", rank, world_size, backend, names)
    return coordinator


def destroy_distributed() -> None:
    """Undo `init_distributed`: close communicators (shared memory included), unregister the group, and
    destroy the process groups. Safe to call when nothing is initialised."""
    coordinator = parallel_state.get_tp_group()
    if coordinator is not None:
        coordinator.destroy()
        ops.unregister_group(coordinator.group_name)
        parallel_state.set_tp_group(None)
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
