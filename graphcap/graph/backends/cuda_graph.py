"""CUDA `full` backend: one `torch.cuda.CUDAGraph` per bucket, all sharing one memory pool.

Runners capture the largest bucket first so smaller graphs reuse the pool's blocks. Python's GC is
frozen during capture: a collection inside capture can free tensors whose memory the graph then reuses.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator, Sequence

import torch

from graphcap.graph.backends.base import Replay

WARMUP_RUNS = 2


@contextlib.contextmanager
def capture_stream(device: torch.device | None = None) -> Iterator[torch.cuda.Stream]:
    """The side stream every capture runs on: it first waits for pending work (capture cannot use the
    default stream), Python's GC stays frozen inside (a collection during capture can free memory the graph
    then reuses), and the default stream waits for it afterwards."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    gc.collect()
    gc.freeze()
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        gc.unfreeze()
        torch.cuda.current_stream(device).wait_stream(stream)


def capture_graph(
    fn: Callable[..., object], args: tuple, pool: object, device: torch.device | None = None
) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm `fn(*args)` up, then capture it into `pool`; returns the graph and its static output."""
    graph = torch.cuda.CUDAGraph()
    with capture_stream(device) as stream:
        for _ in range(WARMUP_RUNS):
            fn(*args)
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = fn(*args)
    return graph, out


class CudaGraphBackend:
    name = "full-cuda-graph"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self._reserved_before = torch.cuda.memory_reserved(device)

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        graph, out = capture_graph(fn, args, self.pool, self.device)
        self.graphs.append(graph)

        def replay(current: tuple[torch.Tensor, ...]) -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def memory_bytes(self) -> int:
        return max(0, torch.cuda.memory_reserved(self.device) - self._reserved_before)
