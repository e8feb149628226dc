"""Fix-functionalization and no-op elimination on small hand-made graphs (no Inductor, so fast)."""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

import graphcap.ops  # noqa: F401
from graphcap.compilation.passes.fix_functionalization import FixFunctionalizationPass
from graphcap.compilation.passes.fx_utils import AUTO_FUNCTIONALIZED, emit_functionalized
from graphcap.compilation.passes.noop_elimination import NoOpEliminationPass

aten = torch.ops.aten
EPS = 1e-6


def _norm_graph(read_base_after: bool) -> Graph:
    """relu(x) -> functionalised rms_norm into a fresh buffer -> output; optionally the buffer's old value
    is also returned, which makes mutating it in place unsafe."""
    x0, w0 = torch.randn(4, 8), torch.randn(8)
    g = Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    x.meta["val"], w.meta["val"] = x0, w0
    act = g.call_function(aten.relu.default, (x,))
    act.meta["val"] = x0
    buf = g.call_function(aten.empty.memory_format, ([4, 8],), {"dtype": torch.float32, "device": torch.device("cpu")})
    buf.meta["val"] = x0
    call = emit_functionalized(g, torch.ops.graphcap.rms_norm.default, {"out": buf, "x": act, "weight": w, "eps": EPS}, {"out": x0})
    out = g.call_function(aten.mul.Tensor, (call.outputs["out"], 2.0))
    g.output((out, buf) if read_base_after else (out,))
    return g


def test_fix_functionalization_makes_safe_calls_in_place() -> None:
    g = _norm_graph(read_base_after=False)
    x, w = torch.randn(4, 8), torch.randn(8)
    expected = GraphModule(torch.nn.Module(), g)(x, w)[0]
    fix = FixFunctionalizationPass()
    fix(g)
    assert fix.matches == 1
    assert not [n for n in g.nodes if n.target in AUTO_FUNCTIONALIZED]
    assert [n for n in g.nodes if n.target is torch.ops.graphcap.rms_norm.default]
    torch.testing.assert_close(GraphModule(torch.nn.Module(), g)(x, w)[0], expected, rtol=0, atol=0)


def test_fix_functionalization_keeps_calls_whose_buffer_is_read_later() -> None:
    g = _norm_graph(read_base_after=True)
    fix = FixFunctionalizationPass()
    fix(g)
    assert fix.matches == 0
    assert fix.skipped == {"'out' is read after the call": 1}
    assert [n for n in g.nodes if n.target in AUTO_FUNCTIONALIZED]


def test_fix_functionalization_never_mutates_graph_inputs() -> None:
    g = Graph()
    x, r, w = (g.placeholder(n) for n in "xrw")
    for node, val in ((x, torch.randn(4, 8)), (r, torch.randn(4, 8)), (w, torch.randn(8))):
        node.meta["val"] = val
    call = emit_functionalized(
        g, torch.ops.graphcap.fused_add_rms_norm.default, {"x": x, "residual": r, "weight": w, "eps": EPS},
        {"x": x.meta["val"], "residual": r.meta["val"]},
    )
    g.output((call.outputs["x"], call.outputs["residual"]))
    fix = FixFunctionalizationPass()
    fix(g)
    assert fix.matches == 0 and sum(fix.skipped.values()) == 1


def _count(gm: GraphModule, targets: tuple) -> int:
    return sum(n.target in targets for n in gm.graph.nodes)


def test_noop_elimination_removes_identity_reshapes_slices_and_round_trips() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        same = x.reshape(4, 8)  # identity
        full = aten.slice.Tensor(same, 1, 0, 8)  # whole dim (Python slicing would trace as an alias)
        trip = full.view(2, 16).view(32).view(4, 8)  # chain back to the input shape
        return torch.relu(trip) + x.view(8, 4).sum()  # a real reshape stays

    x = torch.randn(4, 8)
    gm = make_fx(f, tracing_mode="fake")(x)
    views = (aten.view.default, aten.reshape.default, aten.slice.Tensor)
    assert _count(gm, views) >= 5
    noop = NoOpEliminationPass()
    noop(gm.graph)
    gm.recompile()
    assert noop.matches == 3
    assert _count(gm, views) == 1  # only x.view(8, 4)
    torch.testing.assert_close(gm(x), f(x), rtol=0, atol=0)


def test_noop_elimination_respects_symbolic_shapes() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.view(x.shape[0], 8)) + torch.relu(x.view(-1, 4)).sum()

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(4, 8))
    noop = NoOpEliminationPass()
    noop(gm.graph)
    gm.recompile()
    assert noop.matches == 1
    x = torch.randn(6, 8)
    torch.testing.assert_close(gm(x), f(x), rtol=0, atol=0)
