"""CUDA `full` backend: one `torch.cuda.CUDAGraph` per bucket, all sharing one memory pool.

Runners capture the largest bucket first so smaller graphs reuse the pool's blocks. Python's GC is
frozen during capture: a collection inside capture can free tensors whose memory the graph then reuses.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from graphcap.common.cuda_graph import capture_graph
from graphcap.graph.backends.base import Replay

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
