"""Splitting a Dynamo FX graph at its splitting ops (attention, all-reduce) into pieces.

Every splitting-op call becomes a piece of its own and everything between two of them another, so a model
with N attention layers gives 2N+1 pieces. The pieces between attention layers of a uniform decoder are
the same code on different weights; `signature` names that structure so the compiler can compile it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module


@dataclass
class Piece:
    """One submodule of the split graph. `size_dims` lists the (input, dim) pairs whose sizes are symbolic
    and `size_ints` the inputs that are symbolic ints: together they are the concrete size of a call."""

    name: str
    module: GraphModule
    is_splitting_op: bool
    signature: str
    size_dims: tuple[tuple[int, int], ...]
    size_ints: tuple[int, ...]


def op_name(target: Any) -> str | None:
    """"namespace::name" of an operator call target, None for anything that is not a torch op."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def split_graph(gm: GraphModule, splitting_ops: Sequence[str]) -> tuple[GraphModule, list[Piece]]:
    """Split `gm` at calls of `splitting_ops`; returns the stitched graph module and its pieces in order."""
    splitting = set(splitting_ops)
    partition_of: dict[Node, int] = {}
    part = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and op_name(node.target) in splitting:
            part += 1
            partition_of[node] = part
            part += 1
        else:
            partition_of[node] = part
    split_ops = {partition_of[n] for n in partition_of if n.op == "call_function" and op_name(n.target) in splitting}
    split_gm = split_module(gm, None, lambda node: partition_of[node], keep_original_order=True)
    pieces = []
    for node in split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = getattr(split_gm, node.target)
        index = int(node.target.rsplit("_", 1)[1])
        pieces.append(_piece(node.target, module, index in split_ops))
    return split_gm, pieces


def _example(node: Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _is_symbolic(value: Any) -> bool:
    return isinstance(value, torch.SymInt) and not value.node.is_nested_int() and value.node.maybe_as_int() is None


def _piece(name: str, module: GraphModule, is_splitting_op: bool) -> Piece:
    size_dims: list[tuple[int, int]] = []
    size_ints: list[int] = []
    inputs = []
    for i, node in enumerate(n for n in module.graph.nodes if n.op == "placeholder"):
        value = _example(node)
        if isinstance(value, torch.Tensor):
            size_dims.extend((i, d) for d, s in enumerate(value.shape) if _is_symbolic(s))
            inputs.append(f"T{tuple(str(s) for s in value.shape)}{value.stride()}{value.dtype}{value.device}")
        elif _is_symbolic(value):
            size_ints.append(i)
            inputs.append(f"S{value}")
        else:
            inputs.append(repr(value))
    return Piece(name, module, is_splitting_op, _signature(module, inputs), tuple(size_dims), tuple(size_ints))


def _signature(module: GraphModule, inputs: list[str]) -> str:
    """Hash of the piece's structure with node names replaced by positions, plus its inputs' metadata:
    two pieces that differ only in which weights they read hash the same."""
    index = {node: i for i, node in enumerate(module.graph.nodes)}

    def norm(arg: Any) -> str:
        if isinstance(arg, Node):
            return f"%{index[arg]}"
        if isinstance(arg, tuple):  # a tuple and a list output unflatten differently: not the same piece
            return "(" + ",".join(norm(a) for a in arg) + ")"
        if isinstance(arg, list):
            return "[" + ",".join(norm(a) for a in arg) + "]"
        if isinstance(arg, dict):
            return "{" + ",".join(f"{k}:{norm(v)}" for k, v in sorted(arg.items())) + "}"
        return repr(arg)

    lines = list(inputs)
    for node in module.graph.nodes:
        if node.op == "placeholder":
            continue
        target = node.target if node.op in ("call_method", "call_module", "get_attr") else _qualified(node.target)
        if node.op in ("call_module", "get_attr"):
            target = f"{node.op}:{target}"
        lines.append(f"{node.op}|{target}|{norm(node.args)}|{norm(node.kwargs)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _qualified(target: Any) -> str:
    name = op_name(target)
    if name is not None:
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', repr(target))}"
