"""Turn functionalised calls of graphcap's in-place ops back into in-place calls.

Functionalisation makes `op(out, x)` read as "copy `out`, mutate the copy, return it". Inductor would
materialise that copy; when no one can observe the original buffer, mutating it directly is equivalent and
the copy disappears. Safety is decided per mutated tensor, conservatively:

* it is produced inside the graph by an op that returns fresh storage (not a graph input, a parameter,
  or a view whose base others may read);
* every other reader precedes the call in the graph, so nobody reads it after the mutation;
* none of those readers is a view of it (a view would carry the mutation to readers after the call).

Calls that fail the check stay functionalised (Inductor copies for them) and are counted in `skipped`.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from graphcap.compilation.passes.base import GraphPass
from graphcap.compilation.passes.fx_utils import (
    AUTO_FUNCTIONALIZED,
    FunctionalizedCall,
    called_op,
    functionalized_call,
)

# Ops whose schemas claim fresh outputs but that Inductor may lower to aliases of their input.
_HIDDEN_ALIASES = (torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default)


def _returns_fresh(node: Node) -> bool:
    target = node.target
    if node.op != "call_function":
        return False
    if target is operator.getitem:
        return node.args[0].target in AUTO_FUNCTIONALIZED
    if isinstance(target, torch._ops.OpOverload):
        if target in _HIDDEN_ALIASES:
            return False
        return all(r.alias_info is None for r in target._schema.returns)
    return False


def _reads_without_aliasing(node: Node) -> bool:
    if node.target in AUTO_FUNCTIONALIZED:
        return True
    return isinstance(node.target, torch._ops.OpOverload) and _returns_fresh(node)


class FixFunctionalizationPass(GraphPass):
    name = "fix_functionalization"

    def apply(self, graph: Graph) -> int:
        order = {node: i for i, node in enumerate(graph.nodes)}
        count = 0
        for node in list(graph.nodes):
            if not _is_graphcap(called_op(node)):
                continue
            call = functionalized_call(node, refused=self.skipped)
            if call is None:
                continue
            reason = self._unsafe_reason(call, order)
            if reason:
                self.skipped[reason] += 1
                continue
            with graph.inserting_before(node):
                direct = graph.call_function(call.op, kwargs=call.args)
            direct.meta["val"] = None
            order[direct] = order[node]
            for name, out in call.outputs.items():
                out.replace_all_uses_with(call.args[name])
                graph.erase_node(out)
            graph.erase_node(node)
            count += 1
        return count

    @staticmethod
    def _unsafe_reason(call: FunctionalizedCall, order: dict[Node, int]) -> str | None:
        for name in call.mutable:
            base = call.args[name]
            if not isinstance(base, Node) or not _returns_fresh(base):
                return f"'{name}' is not a fresh in-graph tensor"
            for user in base.users:
                if user is call.node:
                    continue
                if order.get(user, len(order)) > order[call.node]:
                    return f"'{name}' is read after the call"
                if not _reads_without_aliasing(user):
                    return f"'{name}' has a view"
        return None


def _is_graphcap(op: object) -> bool:
    return isinstance(op, torch._ops.OpOverload) and op.namespace == "graphcap"
