"""A uniform view of functionalised custom-op calls, so the passes read and build them by argument name.

Dynamo records an in-place custom op as `auto_functionalized_v2(op, _all_bases=[...], _<arg>_base_index=i,
...)` whose result is `(op result, *new values of the bases)`; the older v1 form passes mutable args by name
and returns `(op result, *new values in schema order)`. Our ops return nothing, so the new value of mutable
argument i is always `getitem(node, 1 + i)`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from torch.fx import Graph, Node

AUTO_FUNCTIONALIZED = (auto_functionalized, auto_functionalized_v2)


@dataclass
class FunctionalizedCall:
    node: Node
    op: torch._ops.OpOverload
    args: dict[str, Any]  # every schema argument by name; a mutable one maps to the tensor it mutates
    mutable: list[str]  # mutable argument names, in the order of the node's outputs
    outputs: dict[str, Node]  # mutable argument -> the getitem holding its new value (absent if unused)

    def output_users(self, name: str) -> list[Node]:
        out = self.outputs.get(name)
        return [] if out is None else list(out.users)


def _mutable_names(op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def functionalized_call(node: Node, op: torch._ops.OpOverload | None = None) -> FunctionalizedCall | None:
    """The call `node` makes, if it is an auto_functionalized call (of `op`, when given) on whole tensors;
    None otherwise, including when a mutable argument is a view of its base (patterns never match views)."""
    if node.op != "call_function" or node.target not in AUTO_FUNCTIONALIZED:
        return None
    target = node.args[0]
    if op is not None and target != op:
        return None
    mutable = _mutable_names(target)
    kwargs = dict(node.kwargs)
    if node.target is auto_functionalized_v2:
        bases = kwargs.pop("_all_bases")
        order: list[str] = [""] * len(bases)
        for name in mutable:
            index = kwargs.pop(f"_{name}_base_index")
            if index is None or any(k.startswith(f"_{name}_") for k in kwargs):
                return None
            kwargs[name] = bases[index]
            order[index] = name
        if "" in order:
            return None
        mutable = order
    outputs: dict[str, Node] = {}
    for user in node.users:
        if user.target is operator.getitem and 1 <= user.args[1] <= len(mutable):
            outputs[mutable[user.args[1] - 1]] = user
    return FunctionalizedCall(node, target, kwargs, mutable, outputs)


def emit_functionalized(
    graph: Graph, op: torch._ops.OpOverload, args: dict[str, Any], vals: dict[str, Any]
) -> FunctionalizedCall:
    """Insert `auto_functionalized_v2(op, **args)` at the graph's current insertion point.

    `vals` gives the example value (meta["val"]) of each mutable argument's new value; the replaced nodes
    already carry them, and Inductor's later passes need them to reason about storage.
    """
    mutable = _mutable_names(op)
    kwargs = {k: v for k, v in args.items() if k not in mutable}
    for i, name in enumerate(mutable):
        kwargs[f"_{name}_base_index"] = i
    kwargs["_all_bases"] = [args[name] for name in mutable]
    node = graph.call_function(auto_functionalized_v2, (op,), kwargs)
    node.meta["val"] = (None, *(vals[name] for name in mutable))
    outputs = {}
    for i, name in enumerate(mutable):
        out = graph.call_function(operator.getitem, (node, 1 + i))
        out.meta["val"] = vals[name]
        outputs[name] = out
    return FunctionalizedCall(node, op, dict(args), mutable, outputs)


def getitem_source(node: Any) -> tuple[FunctionalizedCall, str] | None:
    """(call, mutable arg name) when `node` is the new value of a functionalised call's mutable argument."""
    if not isinstance(node, Node) or node.target is not operator.getitem:
        return None
    call = functionalized_call(node.args[0])
    if call is None:
        return None
    for name, out in call.outputs.items():
        if out is node:
            return call, name
    return None


def erase_call(graph: Graph, call: FunctionalizedCall) -> None:
    """Erase a functionalised call and its getitems once nothing reads them, then allocations it orphaned."""
    for out in call.outputs.values():
        if not out.users:
            graph.erase_node(out)
    if call.node.users:
        return
    bases = [call.args[name] for name in call.mutable]
    graph.erase_node(call.node)
    for base in bases:
        if isinstance(base, Node) and not base.users and base.target in _ALLOCATIONS:
            graph.erase_node(base)


_ALLOCATIONS = (
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
)
