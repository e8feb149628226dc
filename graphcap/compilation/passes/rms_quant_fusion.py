"""RMSNorm (plain or fused-add) followed by FP8 quantisation -> one fused op.

The normed activation then never reaches memory in the model dtype: the fused op writes fp8 directly. The
match requires the normed value to feed only the quantisation; any other reader needs it materialised.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx import Graph

import graphcap.ops  # noqa: F401  (registers the ops named below)
from graphcap.compilation.passes.base import GraphPass
from graphcap.compilation.passes.fx_utils import (
    FunctionalizedCall,
    called_op,
    emit_functionalized,
    erase_call,
    functionalized_call,
    getitem_source,
)

_ops = torch.ops.graphcap
QUANT_OPS = {
    "static": _ops.static_scaled_fp8_quant.default,
    "dynamic": _ops.dynamic_per_token_scaled_fp8_quant.default,
}
# (norm op, quant kind) -> fused op
FUSED = {
    (_ops.rms_norm.default, "static"): _ops.rms_norm_static_fp8_quant.default,
    (_ops.rms_norm.default, "dynamic"): _ops.rms_norm_dynamic_per_token_fp8_quant.default,
    (_ops.fused_add_rms_norm.default, "static"): _ops.fused_add_rms_norm_static_fp8_quant.default,
    (_ops.fused_add_rms_norm.default, "dynamic"): _ops.fused_add_rms_norm_dynamic_per_token_fp8_quant.default,
}
# which mutable argument of each norm op holds its normed output
NORM_OUTPUT = {_ops.rms_norm.default: "out", _ops.fused_add_rms_norm.default: "x"}


def new_value(call: FunctionalizedCall, name: str):
    """Example value of a mutable argument after the call (same metadata as before it)."""
    out = call.outputs.get(name)
    return (out if out is not None else call.args[name]).meta["val"]


def fuse_producer_into_quant(
    graph: Graph, producer: FunctionalizedCall, quant: FunctionalizedCall, fused: torch._ops.OpOverload
) -> None:
    """Replace `producer -> quant` by `fused`, which writes the quant's buffers and updates every other
    mutable argument of the producer (e.g. the residual) as the producer did."""
    schema_args = [a.name for a in fused._schema.arguments]
    args = {}
    for name in schema_args:
        if name in quant.args and name != "x":
            args[name] = quant.args[name]
        else:
            args[name] = producer.args[name]
    # mutable producer args the fused op also updates; the producer's output the quant read is not one
    carried = [n for n in producer.mutable if n in schema_args and n not in quant.args]
    vals = {n: new_value(quant, n) for n in quant.mutable}
    vals.update({n: new_value(producer, n) for n in carried})
    with graph.inserting_before(quant.node):
        new = emit_functionalized(graph, fused, args, vals)
    for name in quant.mutable:
        if name in quant.outputs:
            quant.outputs[name].replace_all_uses_with(new.outputs[name])
    for name in carried:
        if name in producer.outputs:
            producer.outputs[name].replace_all_uses_with(new.outputs[name])
    erase_call(graph, quant)
    erase_call(graph, producer)


class RMSNormQuantFusionPass(GraphPass):
    name = "rms_quant_fusion"

    def __init__(self, quant_kinds: Iterable[str] = ("static", "dynamic")) -> None:
        kinds = tuple(sorted(set(quant_kinds)))
        unknown = set(kinds) - set(QUANT_OPS)
        if unknown:
            raise ValueError(f"unknown quant kinds {sorted(unknown)}; known: {sorted(QUANT_OPS)}")
        super().__init__(quant_kinds=kinds)

    def apply(self, graph: Graph) -> int:
        kinds = {QUANT_OPS[k]: k for k in self.options["quant_kinds"]}
        count = 0
        for node in list(graph.nodes):
            if called_op(node) not in kinds:
                continue
            quant = functionalized_call(node, refused=self.skipped)
            if quant is None:
                continue
            source = getitem_source(quant.args["x"], NORM_OUTPUT, self.skipped)
            if source is None:
                continue
            norm, normed = source
            if NORM_OUTPUT.get(norm.op) != normed or len(norm.outputs[normed].users) != 1:
                continue
            fuse_producer_into_quant(graph, norm, quant, FUSED[(norm.op, kinds[quant.op])])
            count += 1
        if count:
            stable_topological_sort(graph)
        return count
