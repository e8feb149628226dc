"""CPU `full` backend: Inductor-compiled callables per bucket (the CPU analogue of a CUDA graph).

A capture compiles its own copy of the step function with Dynamo's guards skipped. Guards would re-check
hundreds of lifted tensors on every call (about a millisecond on a small model, as much as the whole
compiled step); they are safe to drop because the runner only ever calls a bucket's callable with that
bucket's static buffers. Buckets whose arguments differ only in the dimensions the runner marks dynamic
share one compile: a cold compile costs tens of seconds here, and the shared code runs as fast as
per-size code (docs/benchmarks.md).

Each compile is made with `aot_compile` (the same Dynamo trace and Inductor code as calling the compiled
function, but returned as an object that can be saved), so that with a graph cache (graph/cache.py) a
later start loads it without tracing the model again.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from graphcap.common.digest import digest_of
from graphcap.graph.backends.base import Replay
from graphcap.graph.cache import ARTIFACT

if TYPE_CHECKING:
    from graphcap.graph.cache import GraphCache

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
        self.cache: GraphCache | None = None

    def use_cache(self, cache: GraphCache) -> None:
        """Load compiles from `cache` where it holds them, and save the ones made."""
        self.cache = cache

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        key = signature(fn, args, dynamic)
        if key not in self.compiled:
            step = self._load_or_compile(fn, args, dynamic, unit_name(fn, key))
            self.compiled[key] = (fn, step)  # fn kept alive, so its id in the key is never reused
        compiled = self.compiled[key][1]
        return lambda current: compiled(*current)

    def _load_or_compile(self, fn: Callable, args: tuple[torch.Tensor, ...], dynamic: Sequence[tuple[int, int]],
                         name: str) -> Callable:
        unit = self.cache.unit(name) if self.cache is not None else None
        modules = closure_modules(fn)
        if unit is not None:
            loaded = unit.load(lambda path: _load(path, fn, modules))
            if loaded is not None:
                return loaded
        compiled = torch.compile(
            fresh_function(fn),
            fullgraph=True,
            dynamic=False,
            options={**self.options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
        )
        for index, dim in dynamic:
            torch._dynamo.mark_dynamic(args[index], dim)
        with unit.compiling() if unit is not None else contextlib.nullcontext():
            step = compiled.aot_compile((args, {}))
            step.disable_guard_check()  # the guards were filtered out; this also skips binding the arguments
            step(*args)  # anything the compiled code loads lazily loads now, from the unit's directory
        if unit is not None:
            unit.save(lambda path: step.save_compiled_function(str(path / ARTIFACT), external_data=modules))
        return step

    def discard(self) -> None:
        """Forget every compile, and the cache's copies of them: the next captures compile afresh."""
        for key, (fn, _) in list(self.compiled.items()):
            if self.cache is not None:
                self.cache.unit(unit_name(fn, key)).discard()
        self.compiled.clear()

    def compiles(self) -> int:
        return len(self.compiled)

    def memory_bytes(self) -> int:
        return 0



def closure_modules(fn: Callable) -> dict[str, nn.Module]:
    """The modules `fn` closes over, by position: a saved compile refers to them by these names instead
    of serialising them, and a load hands it the current process's modules under the same names."""
    cells = fn.__closure__ or ()
    return {f"closure{i}": c.cell_contents for i, c in enumerate(cells) if isinstance(c.cell_contents, nn.Module)}


def _load(path: Path, fn: Callable, modules: dict[str, nn.Module]) -> Callable:
    """A saved compile of `fn` (loading it loads its libraries, from the unit's directory)."""
    with open(path / ARTIFACT, "rb") as f:
        step = torch.compiler.load_compiled_function(f, f_globals=fn.__globals__, external_data=modules)
    step.disable_guard_check()
    return step


def unit_name(fn: Callable, key: tuple) -> str:
    """The graph cache's name for the compile of `fn` with `signature` `key`: the function's name and what
    the compile was specialised on (the function's id is this process's, its code is in the cache key)."""
    return f"{fn.__name__}-{digest_of(key[1:], length=12)}"


def signature(fn: Callable, args: Sequence[torch.Tensor], dynamic: Sequence[tuple[int, int]]) -> tuple:
    """What a compiled copy is specialised on: the function, and every argument's dtype, strides and sizes
    except the dynamic ones. Guards are skipped, so two captures may share a compile only if this matches."""
    marked = set(dynamic)
    return (id(fn), tuple(sorted(marked)), tuple(
        (a.dtype, a.stride(), tuple(None if (i, d) in marked else n for d, n in enumerate(a.shape)))
        for i, a in enumerate(args)
    ))
