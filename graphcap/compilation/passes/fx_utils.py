"""A uniform view of functionalised custom-op calls, so the passes read and build them by argument name.

Dynamo records an in-place custom op as `auto_functionalized_v2(op, _all_bases=[...], _<arg>_base_index=i,
...)` whose result is `(op result, *new values of the bases)`; the older v1 form passes mutable args by name
and returns `(op result, *new values in schema order)`. Our ops return nothing, so the new value of mutable
argument i is always `getitem(node, 1 + i)`.

In v2 a mutable argument may be a view of its base, described by extra kwargs: `_<arg>_alias=True` (same
size, strides and offset as the base), `_<arg>_size/_stride/_storage_offset` (an as_strided view) or
`_<arg>_slice_dim/_start/_end`. Graphs compiled piece by piece record even freshly allocated out-buffers in
the alias form, so treating every view as unmatchable would disable the fusions there. A view that is the
whole base (alias, or as_strided with the base's size, zero offset and contiguous strides on both) mutates
exactly the base, so the call is read as if it took the base; any other view is refused, with its reason.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Collection

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

AUTO_FUNCTIONALIZED = (auto_functionalized, auto_functionalized_v2)


@dataclass
class FunctionalizedCall:
    node: Node
    op: torch._ops.OpOverload
    args: dict[str, Any]  # every schema argument by name; a mutable one maps to the tensor it mutates
    mutable: list[str]  # mutable argument names, in the order of the node's outputs
    outputs: dict[str, Node]  # mutable argument -> the getitem holding its new value (absent if unused)


def _mutable_names(op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def called_op(node: Node) -> torch._ops.OpOverload | None:
    """The custom op an auto_functionalized node calls; None for any other node."""
    if node.op != "call_function" or node.target not in AUTO_FUNCTIONALIZED:
        return None
    return node.args[0]


def functionalized_call(
    node: Node, op: torch._ops.OpOverload | None = None, refused: Counter[str] | None = None
) -> FunctionalizedCall | None:
    """The call `node` makes, if it is an auto_functionalized call (of `op`, when given) on whole tensors.

    None otherwise. When the node is such a call but a mutable argument is a partial view of its base (or
    two arguments share a base), the reason is counted in `refused`: the passes report what they left alone.
    """
    target = called_op(node)
    if target is None or (op is not None and target != op):
        return None
    mutable = _mutable_names(target)
    kwargs = dict(node.kwargs)
    if node.target is auto_functionalized_v2:
        bases = kwargs.pop("_all_bases")
        order: list[str] = [""] * len(bases)
        for name in mutable:
            index = kwargs.pop(f"_{name}_base_index")
            reason = _view_refusal(name, index, bases, kwargs)
            if reason is None and order[index]:
                reason = f"'{order[index]}' and '{name}' share a base"
            if reason is not None:
                if refused is not None:
                    refused[reason] += 1
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


def _view_refusal(name: str, index: int | None, bases: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Why mutable argument `name` cannot be read as its base, or None when it can; pops its view kwargs."""
    if index is None:
        return f"'{name}' is None"
    view = {key: kwargs.pop(f"_{name}_{key}") for key in _VIEW_KEYS if f"_{name}_{key}" in kwargs}
    if not view or view == {"alias": True}:
        return None
    if set(view) == {"size", "stride", "storage_offset"}:
        if _covers_base(bases[index], view["size"], view["stride"], view["storage_offset"]):
            return None
        return f"'{name}' is a strided view of part of its base"
    if set(view) == {"slice_dim", "slice_start", "slice_end"}:
        return f"'{name}' is a slice of its base"
    return f"'{name}' has unknown view metadata {sorted(view)}"


# the kwargs suffixes with which auto_functionalized_v2 describes a mutable argument as a view of its base
_VIEW_KEYS = ("alias", "size", "stride", "storage_offset", "slice_dim", "slice_start", "slice_end")


def _covers_base(base: Any, size: Any, stride: Any, offset: Any) -> bool:
    """Whether the as_strided view (size, stride, offset) of `base` is all of it, element for element: same
    size, offset zero, both contiguous. Strides of size-1 dims are ignored, as they address nothing."""
    val = base.meta.get("val") if isinstance(base, Node) else None
    if not isinstance(val, torch.Tensor) or len(size) != val.dim() or len(stride) != val.dim():
        return False
    if not statically_known_true(sym_eq(tuple(size), tuple(val.shape))):
        return False
    if not (statically_known_true(sym_eq(offset, 0)) and statically_known_true(sym_eq(val.storage_offset(), 0))):
        return False
    expected = 1
    for dim in reversed(range(val.dim())):
        if not statically_known_true(sym_eq(size[dim], 1)) and not (
            statically_known_true(sym_eq(stride[dim], expected))
            and statically_known_true(sym_eq(val.stride()[dim], expected))
        ):
            return False
        expected = expected * size[dim]
    return True


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


def getitem_source(
    node: Any, ops: Collection[torch._ops.OpOverload], refused: Counter[str] | None = None
) -> tuple[FunctionalizedCall, str] | None:
    """(call, mutable arg name) when `node` is the new value of a mutable argument of a functionalised call
    of one of `ops`; a call of `ops` refused for its views is counted in `refused`."""
    if not isinstance(node, Node) or node.target is not operator.getitem:
        return None
    if called_op(node.args[0]) not in ops:
        return None
    call = functionalized_call(node.args[0], refused=refused)
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
