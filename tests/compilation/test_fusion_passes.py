"""The fusion passes inside real Inductor compilations, in the style of vLLM's pass tests.

One model chains every pattern (RMSNorm -> static/dynamic fp8 linear, fused-add RMSNorm -> both, SiLU-mul ->
static fp8 linear, all-reduce -> fused-add RMSNorm); it is compiled once per pass configuration (cached
for the module) and we check the post-pass graph, the match counts, and the outputs. Outputs must equal
eager bitwise: each fused op's reference composes the unfused ops' references, and everything else is
the same extern kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphcap.compilation.config import PassConfig
from graphcap.compilation.passes.fx_utils import AUTO_FUNCTIONALIZED
from graphcap.distributed.ops import register_group, unregister_group
from graphcap.layers.activation import SiluAndMul
from graphcap.layers.custom_op import enabled_custom_ops
from graphcap.layers.linear import ReplicatedLinear
from graphcap.layers.norm import RMSNorm
from graphcap.layers.quantization import Fp8LinearMethod

pytestmark = pytest.mark.slow
GROUP = "test-fusion-single-rank"
H = 32


class _SingleRank:
    world_size = 1

    def all_reduce_impl(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _fp8(in_f: int, out_f: int, scheme: str, g: torch.Generator) -> ReplicatedLinear:
    layer = ReplicatedLinear(in_f, out_f, False, torch.bfloat16, Fp8LinearMethod(scheme, static_input_amax=4.0))
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.2)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


class AllPatterns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        with enabled_custom_ops({"all"}):
            self.norms = nn.ModuleList(RMSNorm(H) for _ in range(5))
            self.act = SiluAndMul()
        for norm in self.norms:
            norm.weight.data = (1 + 0.1 * torch.randn(H, generator=g)).to(torch.bfloat16)
        self.lin_s1, self.lin_s2 = _fp8(H, H, "static", g), _fp8(H, H, "static", g)
        self.lin_d1, self.lin_d2 = _fp8(H, H, "dynamic", g), _fp8(H, H, "dynamic", g)
        self.up, self.down = _fp8(H, 2 * H, "static", g), _fp8(H, H, "static", g)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin_s1(self.norms[0](x))  # rms_norm -> static quant
        h, residual = self.norms[1](h, residual)  # fused_add -> static quant
        h = self.lin_d1(self.norms[2](self.lin_s2(h)))  # rms_norm -> dynamic quant
        h, residual = self.norms[3](h, residual)  # fused_add -> dynamic quant
        h = self.down(self.act(self.up(self.lin_d2(h))))  # up: unfusable static quant; silu -> static quant
        h = torch.ops.graphcap.all_reduce(h, GROUP)  # all-reduce -> fused_add
        return self.norms[4](h, residual)


UNFUSED = {
    "graphcap::rms_norm": 2, "graphcap::fused_add_rms_norm": 3, "graphcap::static_scaled_fp8_quant": 4,
    "graphcap::dynamic_per_token_scaled_fp8_quant": 2, "graphcap::silu_and_mul": 1, "graphcap::all_reduce": 1,
}
RMS_QUANT = {
    "graphcap::rms_norm": -2, "graphcap::fused_add_rms_norm": -2, "graphcap::static_scaled_fp8_quant": -2,
    "graphcap::dynamic_per_token_scaled_fp8_quant": -2, "graphcap::rms_norm_static_fp8_quant": 1,
    "graphcap::rms_norm_dynamic_per_token_fp8_quant": 1, "graphcap::fused_add_rms_norm_static_fp8_quant": 1,
    "graphcap::fused_add_rms_norm_dynamic_per_token_fp8_quant": 1,
}
ACT_QUANT = {"graphcap::silu_and_mul": -1, "graphcap::static_scaled_fp8_quant": -1, "graphcap::silu_and_mul_static_fp8_quant": 1}
ALLREDUCE = {"graphcap::all_reduce": -1, "graphcap::fused_add_rms_norm": -1, "graphcap::all_reduce_fused_add_rms_norm": 1}

CASES = {  # name: (PassConfig, expected match counts, op-count deltas applied to UNFUSED)
    "none": (PassConfig(False, False, False, False), {}, []),
    "rms_quant": (PassConfig(enable_rms_quant_fusion=True, enable_act_quant_fusion=False,
                             enable_allreduce_rms_fusion=False), {"rms_quant_fusion": 4}, [RMS_QUANT]),
    "act_quant": (PassConfig(enable_rms_quant_fusion=False, enable_act_quant_fusion=True,
                             enable_allreduce_rms_fusion=False), {"act_quant_fusion": 1}, [ACT_QUANT]),
    "allreduce": (PassConfig(enable_rms_quant_fusion=False, enable_act_quant_fusion=False,
                             enable_allreduce_rms_fusion=True), {"allreduce_rms_fusion": 1}, [ALLREDUCE]),
    "all": (PassConfig(), {"rms_quant_fusion": 4, "act_quant_fusion": 1, "allreduce_rms_fusion": 1},
            [RMS_QUANT, ACT_QUANT, ALLREDUCE]),
}


@pytest.fixture(scope="module")
def setup(compiler):
    register_group(GROUP, _SingleRank())
    model = AllPatterns()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(6, H, generator=g).to(torch.bfloat16), torch.randn(6, H, generator=g).to(torch.bfloat16))
    with torch.no_grad():
        eager = model(*args)
    yield model, args, eager, {}, compiler
    unregister_group(GROUP)


def _compiled(setup, case: str):
    model, args, eager, cache, compiler = setup
    if case not in cache:
        with torch.no_grad():
            cache[case] = compiler(model, args, CASES[case][0])
    return cache[case]


@pytest.mark.parametrize("case", list(CASES))
def test_pass_rewrites_exactly_its_pattern(setup, count_ops, case: str) -> None:
    eager = setup[2]
    out, manager = _compiled(setup, case)
    config, expected_matches, deltas = CASES[case]
    expected_ops = dict(UNFUSED)
    for delta in deltas:
        for op, d in delta.items():
            expected_ops[op] = expected_ops.get(op, 0) + d
    counts = count_ops(manager.graphs[0])
    assert {op: n for op, n in counts.items() if op.startswith("graphcap::")} == {
        op: n for op, n in expected_ops.items() if n
    }
    matches = manager.match_counts()
    for name in ("rms_quant_fusion", "act_quant_fusion", "allreduce_rms_fusion"):
        if name in matches:
            assert matches[name] == expected_matches.get(name, 0), name
    for got, want in zip(out, eager):
        assert torch.equal(got, want)


def test_fix_functionalization_leaves_only_unsafe_calls(setup) -> None:
    """Every graphcap call is in place except the one that updates the graph input `residual`."""
    _, manager = _compiled(setup, "all")
    left = [n for n in manager.graphs[0].nodes if n.target in AUTO_FUNCTIONALIZED]
    assert len(left) == 1
    assert left[0].args[0] == torch.ops.graphcap.fused_add_rms_norm_static_fp8_quant.default
    fix = manager.fix_functionalization
    # 7 graphcap calls remain after fusion (6 fused ops + the unfusable quant before `up`); 1 is unsafe
    assert fix.matches == 6
    assert dict(fix.skipped) == {"'residual' is not a fresh in-graph tensor": 1}
