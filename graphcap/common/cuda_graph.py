"""The one CUDA-graph capture primitive every graph mode uses (full decode, breakable segments, piecewise
pieces): a side stream, Python's GC frozen, warm-up runs, capture into a shared pool."""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

import torch

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
