"""Functionalised calls whose mutable argument is a view of its base (auto_functionalized_v2's view kwargs):
a view that is the whole base fuses like the base itself, any partial view is refused and counted by reason.

Piecewise compiles record freshly allocated out-buffers as `_out_alias=True` views, so without this the
fusions never fire there. Hand-made graphs, no Inductor, so fast.
"""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2
from torch.fx import Graph, GraphModule

import graphcap.ops  # noqa: F401
from graphcap.compilation.passes.fix_functionalization import FixFunctionalizationPass
from graphcap.compilation.passes.fx_utils import AUTO_FUNCTIONALIZED, emit_functionalized
from graphcap.compilation.passes.rms_quant_fusion import RMSNormQuantFusionPass
from graphcap.ops.quant_ops import FP8_DTYPE

aten = torch.ops.aten
_ops = torch.ops.graphcap
EPS = 1e-6


def _norm_quant_graph(rows: int, base_shape: list[int], view: dict[str, Any]) -> Graph:
    """rms_norm(x: [rows, 8]) -> static fp8 quant whose `out` is described to auto_functionalized_v2 by
    `view` (the `_out_*` kwargs without their prefix) relative to a fresh fp8 base of `base_shape`."""
    x0, w0, s0 = torch.randn(rows, 8), torch.randn(8), torch.tensor(0.05)
    g = Graph()
    x, w, scale = g.placeholder("x"), g.placeholder("w"), g.placeholder("scale")
    x.meta["val"], w.meta["val"], scale.meta["val"] = x0, w0, s0
    buf = g.call_function(aten.empty.memory_format, ([rows, 8],), {"dtype": torch.float32})
    buf.meta["val"] = torch.empty(rows, 8)
    norm = emit_functionalized(g, _ops.rms_norm.default, {"out": buf, "x": x, "weight": w, "eps": EPS},
                               {"out": buf.meta["val"]})
    qbuf = g.call_function(aten.empty.memory_format, (base_shape,), {"dtype": FP8_DTYPE})
    qbuf.meta["val"] = torch.empty(base_shape, dtype=FP8_DTYPE)
    kwargs = {"x": norm.outputs["out"], "scale": scale, "_out_base_index": 0, "_all_bases": [qbuf]}
    kwargs.update({f"_out_{k}": v for k, v in view.items()})
    quant = g.call_function(auto_functionalized_v2, (_ops.static_scaled_fp8_quant.default,), kwargs)
    quant.meta["val"] = (None, qbuf.meta["val"])
    new_base = g.call_function(operator.getitem, (quant, 1))
    new_base.meta["val"] = qbuf.meta["val"]
    g.output((new_base,))
    return g


def _run(g: Graph, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return GraphModule(torch.nn.Module(), g)(*inputs)[0].float()


def _called(g: Graph) -> list[str]:
    return [(n.args[0] if n.target in AUTO_FUNCTIONALIZED else n.target)._schema.name
            for n in g.nodes if n.op == "call_function" and n.target is not operator.getitem
            and n.target is not aten.empty.memory_format]


WHOLE = {
    "alias": ([4, 8], {"alias": True}),
    "as_strided of all of it": ([4, 8], {"size": [4, 8], "stride": [8, 1], "storage_offset": 0}),
    "as_strided, size-1 dim with any stride": ([1, 8], {"size": [1, 8], "stride": [99, 1], "storage_offset": 0}),
}


@pytest.mark.parametrize("case", sorted(WHOLE))
def test_view_that_is_the_whole_base_fuses_and_computes_the_same(case: str) -> None:
    base_shape, view = WHOLE[case]
    g = _norm_quant_graph(base_shape[0], base_shape, view)
    inputs = (torch.randn(base_shape[0], 8), torch.randn(8), torch.tensor(0.05))
    expected = _run(g, inputs)
    fusion = RMSNormQuantFusionPass()
    fusion(g)
    g.lint()
    assert fusion.matches == 1 and not fusion.skipped
    assert _called(g) == ["graphcap::rms_norm_static_fp8_quant"]
    torch.testing.assert_close(_run(g, inputs), expected, rtol=0, atol=0)


PARTIAL = {
    "as_strided of part of it": ([8, 8], {"size": [4, 8], "stride": [8, 1], "storage_offset": 0},
                                 "'out' is a strided view of part of its base"),
    "as_strided at an offset": ([5, 8], {"size": [4, 8], "stride": [8, 1], "storage_offset": 8},
                                "'out' is a strided view of part of its base"),
    "transposed strides": ([8, 4], {"size": [4, 8], "stride": [1, 4], "storage_offset": 0},
                           "'out' is a strided view of part of its base"),
    "slice": ([8, 8], {"slice_dim": 0, "slice_start": 0, "slice_end": 4}, "'out' is a slice of its base"),
}


@pytest.mark.parametrize("case", sorted(PARTIAL))
def test_partial_view_is_refused_with_its_reason(case: str) -> None:
    base_shape, view, reason = PARTIAL[case]
    g = _norm_quant_graph(4, base_shape, view)
    before = _called(g)
    fusion, fix = RMSNormQuantFusionPass(), FixFunctionalizationPass()
    fusion(g)
    fix(g)
    assert fusion.matches == 0 and fusion.skipped == {reason: 1}
    assert fix.skipped == {reason: 1}  # the norm became in place; the quant stays functionalised
    assert fix.matches == 1
    assert sorted(_called(g)) == sorted(before)


def test_fix_functionalization_makes_an_alias_form_call_in_place() -> None:
    g = _norm_quant_graph(4, [4, 8], {"alias": True})
    inputs = (torch.randn(4, 8), torch.randn(8), torch.tensor(0.05))
    expected = _run(g, inputs)
    fix = FixFunctionalizationPass()
    fix(g)
    assert fix.matches == 2 and not fix.skipped
    assert not [n for n in g.nodes if n.target in AUTO_FUNCTIONALIZED]
    torch.testing.assert_close(_run(g, inputs), expected, rtol=0, atol=0)
