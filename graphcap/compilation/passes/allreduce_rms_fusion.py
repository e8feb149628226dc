"""All-reduce followed by fused-add RMSNorm -> one op, the tensor-parallel epilogue of attention and MLP.

A communicator with a one-shot kernel can then reduce, add the residual and normalise in one pass over
the data; the op's fallback is the unfused sequence, so the rewrite is correct on every communicator.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx import Graph

import graphcap.ops  # noqa: F401  (registers the ops named below)
from graphcap.compilation.passes.base import GraphPass
from graphcap.compilation.passes.fx_utils import emit_functionalized, erase_call, functionalized_call
from graphcap.compilation.passes.rms_quant_fusion import new_value

_ops = torch.ops.graphcap


class AllReduceRMSNormFusionPass(GraphPass):
    name = "allreduce_rms_fusion"

    def apply(self, graph: Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            norm = functionalized_call(node, _ops.fused_add_rms_norm.default, self.skipped)
            if norm is None:
                continue
            reduced = norm.args["x"]
            if reduced.target != _ops.all_reduce.default or len(reduced.users) != 1:
                continue
            x, group_name = _all_reduce_args(reduced)
            args = dict(norm.args, x=x, group_name=group_name)
            vals = {name: new_value(norm, name) for name in norm.mutable}
            with graph.inserting_before(norm.node):
                fused = emit_functionalized(graph, _ops.all_reduce_fused_add_rms_norm.default, args, vals)
            for name, out in norm.outputs.items():
                out.replace_all_uses_with(fused.outputs[name])
            erase_call(graph, norm)
            graph.erase_node(reduced)
            count += 1
        if count:
            stable_topological_sort(graph)
        return count


def _all_reduce_args(node: torch.fx.Node) -> tuple[torch.fx.Node, str]:
    bound = node.target._schema.arguments
    values = dict(zip((a.name for a in bound), node.args))
    values.update(node.kwargs)
    return values["x"], values["group_name"]
