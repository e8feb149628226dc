"""CPU `full` backend: Inductor-compiled callables per bucket (the CPU analogue of a CUDA graph).

A capture compiles its own copy of the step function with Dynamo's guards skipped. Guards would re-check
hundreds of lifted tensors on every call (about a millisecond on a small model, as much as the whole
compiled step); they are safe to drop because the runner only ever calls a bucket's callable with that
bucket's static buffers. Buckets whose arguments differ only in the dimensions the runner marks dynamic
share one compile: a cold compile costs tens of seconds here, and the shared code runs as fast as
per-size code (docs/benchmarks.md).
"""

from __future__ import annotations

import types
from typing import Callable, Sequence

import torch

from graphcap.graph.backends.base import Replay

# Measured on the 2-core CPU machine (docs/benchmarks.md, "Inductor options"); override per run with
# `inductor_options` in the graph config. The generated wrapper re-checks every input's sizes, strides and
# alignment on each call (one check per weight: about 0.15 ms per step on `tiny`); like the guards, these
# checks cannot fail here, because a runner calls its compiled code only with the buffers it compiled it for.
DEFAULT_INDUCTOR_OPTIONS: dict[str, object] = {"size_asserts": False, "alignment_asserts": False,
                                               "scalar_asserts": False}
# A compiled step issues hundreds of small kernel and GEMM calls, so the generated Python wrapper that
# issues them is a large part of it; the C++ wrapper issues them from compiled code. Same-process A/Bs on tiny
# (docs/benchmarks.md): decode +15% end-to-end tokens/s, steps at batch 1 / 4 / 16 +5% / +6% / 0 (turns
# of 4 steps); breakable prefill steps +3-4%. Its compile costs several seconds per graph, so only runners
# with a bounded number of compiles take it: decode (two) and breakable prefill (three segment kinds).
# Encoders compile every bucket and keep the Python wrapper.
CPP_WRAPPER_OPTIONS: dict[str, object] = {"cpp_wrapper": True}


def fresh_function(fn: Callable) -> Callable:
    """A copy of `fn` with its own code object, so Dynamo keeps a separate compiled entry for it."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class InductorBackend:
    name = "full-cpu-inductor"

    def __init__(self, options: dict) -> None:
        self.options = {**DEFAULT_INDUCTOR_OPTIONS, **options}
        self.compiled: dict[tuple, tuple[Callable, Callable]] = {}  # signature -> (fn, compiled copy)

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        key = signature(fn, args, dynamic)
        if key not in self.compiled:
            compiled = torch.compile(
                fresh_function(fn),
                fullgraph=True,
                dynamic=False,
                options={**self.options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
            )
            for index, dim in dynamic:
                torch._dynamo.mark_dynamic(args[index], dim)
            compiled(*args)
            self.compiled[key] = (fn, compiled)  # fn kept alive, so its id in the key is never reused
        compiled = self.compiled[key][1]
        return lambda current: compiled(*current)

    def compiles(self) -> int:
        return len(self.compiled)

    def memory_bytes(self) -> int:
        return 0


def signature(fn: Callable, args: Sequence[torch.Tensor], dynamic: Sequence[tuple[int, int]]) -> tuple:
    """What a compiled copy is specialised on: the function, and every argument's dtype, strides and sizes
    except the dynamic ones. Guards are skipped, so two captures may share a compile only if this matches."""
    marked = set(dynamic)
    return (id(fn), tuple(sorted(marked)), tuple(
        (a.dtype, a.stride(), tuple(None if (i, d) in marked else n for d, n in enumerate(a.shape)))
        for i, a in enumerate(args)
    ))
