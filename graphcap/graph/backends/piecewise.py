"""`piecewise` backend: the step traced once, split at attention, each piece compiled per bucket size.

The step is traced by torch.compile with graphcap's `PiecewiseCompiler` as the backend and its token
dimension (dim 0 of every argument) dynamic, so all buckets share one trace and one split; each piece
then compiles per concrete size, and structurally identical pieces compile once. Attention runs eagerly
between the pieces (the opaque op), which is what lets the same machinery serve prefill's ragged shapes.
On CUDA each piece is a CUDA graph per size.

Dynamo's guards are skipped for the reason given in `cpu_inductor.py`: the runner calls the compiled step
only with its own static buffers. A trace with dim 0 of size 1 is static (Dynamo specialises size 1), so
it gets a trace of its own rather than being served by, or serving, the dynamic one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from graphcap.compilation.backend import PiecewiseCompiler
from graphcap.graph.backends.base import Replay
from graphcap.graph.backends.cpu_inductor import fresh_function


class PiecewiseBackend:
    name = "piecewise"

    def __init__(self, compiler: PiecewiseCompiler) -> None:
        self.compiler = compiler
        self.traces: dict[tuple[int, bool], Callable] = {}

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        dynamic_tokens = args[0].shape[0] >= 2
        key = (id(fn), dynamic_tokens)
        compiled = self.traces.get(key)
        if compiled is None:
            compiled = self.traces[key] = torch.compile(
                fresh_function(fn), backend=self.compiler, fullgraph=True, dynamic=False,
                options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
            )
            marks = [(i, 0) for i, a in enumerate(args) if a.dim() > 0] if dynamic_tokens else []
            for index, dim in {*marks, *dynamic}:
                torch._dynamo.mark_dynamic(args[index], dim)
        compiled(*args)
        return lambda current: compiled(*current)

    def memory_bytes(self) -> int:
        return 0
