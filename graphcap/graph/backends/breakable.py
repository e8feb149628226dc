"""Breakable graphs: the body captured as segments that end where an eager break (attention) begins
and resume after it. Breaks run eagerly with the live batch's metadata, so segments depend only on the
token count.

CUDA: one CUDA graph per segment per bucket, in one shared pool; replay launches segment i, runs break i
and copies its output into the buffer segment i+1 was captured reading. The tensors a break reads (the
previous segment's outputs) are held by strong references for the backend's lifetime: if they were
weak, the pool could hand their memory to another bucket's capture and a replay would read garbage.

CPU: regional compilation. Each segment kind (first, middle, last) is compiled once with a dynamic token
dimension, and the one compiled middle segment serves every layer (weights are inputs, not constants),
so startup pays three small compiles instead of one whole-model trace per bucket. Segments are called
as plain Inductor callables (segment_compile.py), without Dynamo's per-call entry cost. With a graph cache
each segment kind is one of its units.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from graphcap.attention.metadata import AttentionMetadata
from graphcap.graph.backends.base import Replay
from graphcap.graph.backends.cpu_inductor import CPP_WRAPPER_OPTIONS, DEFAULT_INDUCTOR_OPTIONS
from graphcap.common.cuda_graph import capture_stream
from graphcap.graph.backends.segment_compile import CompiledSegment
from graphcap.models.segments import SegmentedBody, run_segmented

if TYPE_CHECKING:
    from graphcap.graph.cache import GraphCache


def _metadata(args: Sequence[torch.Tensor], page_size: int, live: AttentionMetadata | None) -> AttentionMetadata:
    """Metadata for the eager breaks: the bucket-sized token-level tensors of `args`, with the live
    batch's out-of-graph facts (prefix-free, request lengths) when the runner passes them."""
    slot_mapping, block_table, q_index, q_pos, out_index = args[2:7]
    if live is None:
        return AttentionMetadata(slot_mapping, block_table, q_index, q_pos, out_index, page_size)
    return dataclasses.replace(live, slot_mapping=slot_mapping, block_table=block_table, q_index=q_index,
                               q_pos=q_pos, out_index=out_index)


def make_breakable_backend(body: SegmentedBody, device: torch.device, inductor_options: dict, page_size: int):
    if device.type == "cuda":
        return CudaBreakableBackend(body, device, page_size)
    return CpuBreakableBackend(body, inductor_options, page_size)


class CpuBreakableBackend:
    name = "breakable-cpu-regional"
    runs_attention_eagerly = True  # replay(current, live) takes the live batch's metadata

    def __init__(self, body: SegmentedBody, inductor_options: dict, page_size: int) -> None:
        self.page_size = page_size
        # One compiled segment per kind with a dynamic token dimension; every layer passes its own
        # weights as inputs, so the middle segment serves all of them and every bucket.
        options = {**DEFAULT_INDUCTOR_OPTIONS, **CPP_WRAPPER_OPTIONS, **inductor_options}
        self.segments = {"first": CompiledSegment(body.first, 1, options),
                         "middle": CompiledSegment(body.middle, 2, options),
                         "last": CompiledSegment(body.last, 1, options)}
        self.body = SegmentedBody(body.layers, **self.segments, attend=body.attend)

    def use_cache(self, cache: GraphCache) -> None:
        """Load each segment kind from `cache` where it holds it, and save the ones compiled."""
        for kind, segment in self.segments.items():
            segment.unit = cache.unit(f"prefill_segment_{kind}")

    def discard(self) -> None:
        """Forget the compiled segments, and the cache's copies of them: the next capture compiles afresh."""
        for segment in self.segments.values():
            segment.reset()

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        """`fn` is the unsegmented body; this backend runs the same computation from the model's segments."""

        def replay(current: tuple[torch.Tensor, ...], live: AttentionMetadata | None = None) -> torch.Tensor:
            return run_segmented(self.body, current[0], current[1], _metadata(current, self.page_size, live))

        if not all(segment.ready for segment in self.segments.values()):
            replay(args)  # compiles (or loads) the segments; once they are, a bucket needs nothing of its own
        return replay

    def memory_bytes(self) -> int:
        return 0


class CudaBreakableBackend:
    name = "breakable-cuda-graph"
    runs_attention_eagerly = True  # replay(current, live) takes the live batch's metadata

    def __init__(self, body: SegmentedBody, device: torch.device, page_size: int) -> None:
        self.body = body
        self.device = device
        self.page_size = page_size
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[str, tuple] = {}  # strong references: graphs, break inputs/outputs, result
        self._reserved_before = torch.cuda.memory_reserved(device)

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        body, layers = self.body, self.body.layers
        hidden, positions = args[0], args[1]
        meta = _metadata(args, self.page_size, None)
        graphs: list[torch.cuda.CUDAGraph] = []
        breaks: list[tuple] = []
        with capture_stream(self.device) as stream:
            run_segmented(body, hidden, positions, meta)  # warm-up outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                q, k, v, residual = body.first(layers[0], positions, hidden)
            graphs.append(graph)
            for i, layer in enumerate(layers):
                attn_out = body.attend(layer, q, k, v, meta)  # the break: eager, between captures
                breaks.append((layer, q, k, v, attn_out))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    if i + 1 == len(layers):
                        result = body.last(layer, attn_out, residual)
                    else:
                        q, k, v, residual = body.middle(layer, layers[i + 1], positions, attn_out, residual)
                graphs.append(graph)
        self.captured[label] = (graphs, breaks, result)

        def replay(current: tuple[torch.Tensor, ...], live: AttentionMetadata | None = None) -> torch.Tensor:
            live = _metadata(current, self.page_size, live)
            graphs[0].replay()
            for (layer, bq, bk, bv, out), segment in zip(breaks, graphs[1:]):
                out.copy_(body.attend(layer, bq, bk, bv, live))
                segment.replay()
            return result

        return replay

    def memory_bytes(self) -> int:
        return max(0, torch.cuda.memory_reserved(self.device) - self._reserved_before)
