"""CPU `full` backend: one Inductor-compiled callable per bucket (the CPU analogue of a CUDA graph).

Each bucket compiles its own copy of the step function with `dynamic=False` and with Dynamo's guards
skipped. Guards would re-check hundreds of lifted tensors on every call (about a millisecond on a small
model, as much as the whole compiled step); they are safe to drop because the runner only ever calls a
bucket's callable with that bucket's static buffers.
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


def fresh_function(fn: Callable) -> Callable:
    """A copy of `fn` with its own code object, so Dynamo keeps a separate compiled entry for it."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class InductorBackend:
    name = "full-cpu-inductor"

    def __init__(self, options: dict) -> None:
        self.options = {**DEFAULT_INDUCTOR_OPTIONS, **options}

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        compiled = torch.compile(
            fresh_function(fn),
            fullgraph=True,
            dynamic=False,
            options={**self.options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
        )
        for index, dim in dynamic:
            torch._dynamo.mark_dynamic(args[index], dim)
        compiled(*args)
        return lambda current: compiled(*current)

    def memory_bytes(self) -> int:
        return 0
