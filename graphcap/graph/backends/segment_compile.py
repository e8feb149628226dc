"""Compile one body segment into a plain Inductor callable, shared by every layer it serves.

Regional compilation through `torch.compile` pays Dynamo's entry cost on every call (frame evaluation,
re-reading each lifted weight from the module tree): about 60 us per segment on the CPU machine, a
millisecond per prefill step on a 16-layer model. Here a segment is exported once with its weights as
graph inputs and a dynamic token dimension, compiled with `torch._inductor.standalone_compile`, and
called directly with a precomputed flat argument list: no frame evaluation, no guards, and no per-call
attribute walk. Segments are pure functions of their inputs (attention and the KV cache stay in the
eager breaks), so nothing is mutated behind the compiled code's back.

The artifact standalone_compile returns still wraps the generated code in Dynamo's disable context and
AOTAutograd's runtime wrappers (grad mode, output aliasing, input mutation), none of which a pure
inference segment needs. Calling the generated code directly, tiny, two same-process A/Bs: prefill 4x32
5.30 -> 5.11 and 6.95 -> 6.50 ms per step; 1x128 and 8 mixed between 0.4% slower and 2.5% faster. That
code is reached through torch internals (`CompiledFxGraph`; torch is pinned), so it is adopted only after
it has returned exactly what the artifact returns on the first call's real inputs; otherwise the artifact
is called.

With a graph cache unit, the artifact is saved (`CompiledArtifact.save`) with what the export found: which
module weights feed it and the structure of its outputs; a later start loads these instead of exporting
and compiling.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn
from torch._inductor.output_code import CompiledFxGraph
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_unflatten, treespec_dumps, treespec_loads

from graphcap.graph.cache import ARTIFACT

if TYPE_CHECKING:
    from graphcap.graph.cache import CacheUnit

# How deep the search for the generated code may go into the artifact's closures and attributes.
_SEARCH_DEPTH = 8
# Beside a saved artifact: its weight inputs (module index, parameter name) and its output structure.
SEGMENT_META = "segment.json"


class _SegmentModule(nn.Module):
    """Owns the modules a segment reads, so export lifts their weights as named graph inputs."""

    def __init__(self, fn: Callable[..., object], modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.fn = fn
        self.mods = nn.ModuleList(modules)

    def forward(self, *tensors: torch.Tensor) -> object:
        return self.fn(*self.mods, *tensors)


class CompiledSegment:
    """`segment(*modules, *tensors)` runs the compiled code with those modules' weights as inputs.

    Every tensor argument's first dimension is the token count, and only it is dynamic. Compiling
    happens at the first call, on zero-filled stand-ins with `EXAMPLE_TOKENS` rows, so a first call
    with a single token (a dimension the exporter would specialise) compiles the same general code.
    """

    EXAMPLE_TOKENS = 8

    def __init__(self, fn: Callable[..., object], num_modules: int, options: dict) -> None:
        self.fn = fn
        self.num_modules = num_modules
        self.options = dict(options)
        self.compiled: Callable[..., list[torch.Tensor]] | None = None
        self.run_flat: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        self.direct = False  # whether run_flat is the generated code itself
        self.unit: CacheUnit | None = None  # the graph cache's place for this segment's code, if any
        self._weights: list[tuple[int, str] | torch.Tensor] = []
        self._flat: dict[tuple[int, ...], list[torch.Tensor]] = {}

    @property
    def ready(self) -> bool:
        """Compiled (or loaded) and called once: every later call runs the chosen code."""
        return self.run_flat is not None

    def reset(self) -> None:
        """Back to uncompiled, and the cache's copy removed: the next call compiles afresh."""
        if self.unit is not None:
            self.unit.discard()
        self.compiled = self.run_flat = None
        self.direct = False
        self._weights, self._flat = [], {}

    def _compile(self, modules: Sequence[nn.Module], tensors: Sequence[torch.Tensor]) -> None:
        example = tuple(t.new_zeros((self.EXAMPLE_TOKENS, *t.shape[1:])) for t in tensors)
        tokens = torch.export.Dim("tokens", min=2, max=1 << 20)
        with torch.no_grad():
            exported = torch.export.export(_SegmentModule(self.fn, modules), example,
                                           dynamic_shapes=(tuple({0: tokens} for _ in example),), strict=False)
        gm = exported.graph_module
        # standalone_compile reads the symbolic shapes (tokens dynamic, everything else static) from
        # `example_value`; export records them under `val`.
        for node in gm.graph.nodes:
            if "val" in node.meta:
                node.meta["example_value"] = node.meta["val"]
        for spec in exported.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                continue
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                index, _, name = spec.target.removeprefix("mods.").partition(".")
                self._weights.append((int(index), name))
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                self._weights.append(exported.constants[spec.target])
            else:
                raise ValueError(f"segment input of kind {spec.kind.name} cannot be compiled standalone")
        self.out_spec = exported.call_spec.out_spec
        # Inductor options are configuration here (standalone_compile's own `options` are compile_fx
        # arguments, a different namespace).
        with torch.no_grad(), torch._inductor.config.patch(self.options):
            self.compiled = torch._inductor.standalone_compile(
                gm, [*self.weights_of(modules), *example], dynamic_shapes="from_graph"
            )

    def weights_of(self, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
        """The weight inputs for these modules, resolved once per module combination and then reused."""
        key = tuple(id(m) for m in modules)
        flat = self._flat.get(key)
        if flat is None:
            flat = []
            for entry in self._weights:
                if isinstance(entry, torch.Tensor):
                    flat.append(entry)
                    continue
                index, name = entry
                try:
                    flat.append(modules[index].get_parameter(name))
                except AttributeError:
                    flat.append(modules[index].get_buffer(name))
            self._flat[key] = flat
        return flat

    def _choose_runner(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        """First call: run the artifact, and adopt its generated code as the runner if it agrees exactly."""
        compiled = self.compiled
        out = list(compiled(*flat))
        self.run_flat = lambda args: compiled(*args)
        code = _generated_code(compiled)
        if code is not None:
            direct = list(code.current_callable(list(flat)))  # the generated code may clear its argument list
            if len(direct) == len(out) and all(_identical(d, o) for d, o in zip(direct, out)):
                self.run_flat = code.current_callable
                self.direct = True
        return out

    def __call__(self, *modules_and_tensors: object) -> object:
        modules = modules_and_tensors[: self.num_modules]
        tensors = modules_and_tensors[self.num_modules:]
        if self.run_flat is None:
            out = self._first_call(modules, tensors)
        else:
            out = self.run_flat([*self.weights_of(modules), *tensors])
        return tree_unflatten(list(out), self.out_spec)

    def _first_call(self, modules: Sequence[nn.Module], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Load the segment from its cache unit, or compile it (and save it there); then choose its runner."""
        unit = self.unit
        if unit is not None:
            out = unit.load(lambda path: self._load(path, modules, tensors))
            if out is not None:
                return out
            self._weights, self._flat = [], {}  # whatever a failed load left
        with unit.compiling() if unit is not None else contextlib.nullcontext():
            self._compile(modules, tensors)
            out = self._choose_runner([*self.weights_of(modules), *tensors])
        if unit is not None:
            unit.save(self._save)
        return out

    def _save(self, path: Path) -> None:
        if any(isinstance(entry, torch.Tensor) for entry in self._weights):
            raise ValueError("a segment that reads constant tensors is not saved")
        self.compiled.save(path=str(path / ARTIFACT), format="binary")
        meta = {"weights": self._weights, "out_spec": treespec_dumps(self.out_spec)}
        (path / SEGMENT_META).write_text(json.dumps(meta))

    def _load(self, path: Path, modules: Sequence[nn.Module], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from torch._inductor import CompiledArtifact

        meta = json.loads((path / SEGMENT_META).read_text())
        self._weights = [(int(index), str(name)) for index, name in meta["weights"]]
        self.out_spec = treespec_loads(meta["out_spec"])
        self.compiled = CompiledArtifact.load(path=str(path / ARTIFACT), format="binary")
        return self._choose_runner([*self.weights_of(modules), *tensors])


def _generated_code(artifact: object) -> CompiledFxGraph | None:
    """The one `CompiledFxGraph` inside standalone_compile's artifact, found through closures and attributes;
    None when there is not exactly one."""
    found: dict[int, CompiledFxGraph] = {}
    seen: set[int] = set()
    todo = [(artifact, 0)]
    while todo:
        obj, depth = todo.pop()
        if id(obj) in seen or depth > _SEARCH_DEPTH or isinstance(obj, (torch.Tensor, str, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, CompiledFxGraph):
            found[id(obj)] = obj
            continue
        children = [cell.cell_contents for cell in getattr(obj, "__closure__", None) or () if _filled(cell)]
        children += list(getattr(obj, "__dict__", {}).values())
        if isinstance(obj, (list, tuple)):
            children += list(obj)
        todo.extend((child, depth + 1) for child in children)
    return next(iter(found.values())) if len(found) == 1 else None


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty closure cell
        return False
    return True


def _identical(a: object, b: object) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b))
