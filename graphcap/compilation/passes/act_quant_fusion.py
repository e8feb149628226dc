"""SiLU-and-mul followed by static FP8 quantisation -> one fused op, so the activation (half the width of
the gate_up output) is written once, in fp8, instead of once in the model dtype and again in fp8."""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx import Graph

from graphcap.compilation.passes.base import GraphPass
from graphcap.compilation.passes.fx_utils import functionalized_call, getitem_source
from graphcap.compilation.passes.rms_quant_fusion import fuse_producer_into_quant

_ops = torch.ops.graphcap


class ActQuantFusionPass(GraphPass):
    name = "act_quant_fusion"

    def apply(self, graph: Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            quant = functionalized_call(node, _ops.static_scaled_fp8_quant.default, self.skipped)
            if quant is None:
                continue
            source = getitem_source(quant.args["x"], (_ops.silu_and_mul.default,), self.skipped)
            if source is None:
                continue
            act, out = source
            if len(act.outputs[out].users) != 1:
                continue
            fuse_producer_into_quant(graph, act, quant, _ops.silu_and_mul_static_fp8_quant.default)
            count += 1
        if count:
            stable_topological_sort(graph)
        return count
