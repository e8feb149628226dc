"""FP8 quantisation ops, the norm/activation custom ops and the fused ops, against references.

Tolerances: e4m3 keeps 3 mantissa bits, so rounding a normal value costs at most 2^-4 of it, and a value in
the subnormal range at most half the smallest subnormal, 2^-10 * scale.
"""

from __future__ import annotations

import pytest
import torch

from graphcap.distributed.ops import register_group, unregister_group
from graphcap.ops.reference import rms_norm_ref, silu_and_mul_ref
from graphcap.ops import fused_ops, norm_ops, quant_ops
from graphcap.ops.quant_ops import FP8_DTYPE, FP8_MAX, MIN_SCALE

EPS = 1e-6


def assert_fp8_rounding(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> None:
    deq = q.float() * scale
    xf = x.float().clamp(-FP8_MAX * scale, FP8_MAX * scale)
    bound = torch.maximum(xf.abs() * 2**-4, scale * 2**-10) * 1.0001
    assert ((deq - xf).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_quant_rounds_to_nearest_fp8(dtype: torch.dtype) -> None:
    x = torch.randn(7, 33, dtype=dtype) * 3
    scale = torch.tensor(0.01)
    q = quant_ops.static_scaled_fp8_quant(x, scale)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert torch.equal(q.view(torch.uint8), quant_ops.static_fp8_quant_ref(x, scale).view(torch.uint8))
    assert_fp8_rounding(q, scale, x)
    assert q.float().abs().max() == FP8_MAX  # 3*randn/0.01 overflows: saturated, not inf/nan


def test_dynamic_quant_uses_full_range_per_token() -> None:
    x = torch.randn(5, 64) * torch.logspace(-2, 3, 5).unsqueeze(1)
    x[2] = 0
    q, scale = quant_ops.dynamic_per_token_scaled_fp8_quant(x)
    assert scale.shape == (5, 1) and scale.dtype == torch.float32
    live = [0, 1, 3, 4]
    assert torch.equal(q[live].float().abs().amax(-1), torch.full((4,), FP8_MAX))
    assert scale[2].item() == pytest.approx(MIN_SCALE) and (q[2].float() == 0).all()
    assert_fp8_rounding(q, scale, x)


def test_norm_ops_match_native_bitwise_and_leave_inputs_alone() -> None:
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(32, dtype=torch.bfloat16)
    x0, res0 = x.clone(), res.clone()
    assert torch.equal(norm_ops.rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))
    out, new_res = norm_ops.fused_add_rms_norm(x, res, w, EPS)
    assert torch.equal(new_res, x0 + res0)
    assert torch.equal(out, rms_norm_ref(x0 + res0, w, EPS))
    assert torch.equal(x, x0) and torch.equal(res, res0)
    gate_up = torch.randn(6, 64, dtype=torch.bfloat16)
    assert torch.equal(norm_ops.silu_and_mul(gate_up), silu_and_mul_ref(gate_up))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


class _SingleRank:
    world_size = 1

    def all_reduce_impl(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def test_fused_ops_equal_unfused_sequences_bitwise() -> None:
    """The fusion passes swap one for the other, so they must agree to the bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g, dtype=torch.bfloat16)
    res = torch.randn(6, 32, generator=g, dtype=torch.bfloat16)
    w = torch.randn(32, generator=g, dtype=torch.bfloat16)
    s = torch.tensor(0.02)
    new = lambda *shape, dtype=FP8_DTYPE: torch.empty(*shape, dtype=dtype)  # noqa: E731

    normed = norm_ops.rms_norm(x, w, EPS)
    out = new(6, 32)
    fused_ops.rms_norm_static_fp8_quant(out, x, w, s, EPS)
    assert torch.equal(_bits(out), _bits(quant_ops.static_scaled_fp8_quant(normed, s)))

    out, scale = new(6, 32), new(6, 1, dtype=torch.float32)
    fused_ops.rms_norm_dynamic_per_token_fp8_quant(out, scale, x, w, EPS)
    q, qs = quant_ops.dynamic_per_token_scaled_fp8_quant(normed)
    assert torch.equal(_bits(out), _bits(q)) and torch.equal(scale, qs)

    add_normed, summed = norm_ops.fused_add_rms_norm(x, res, w, EPS)
    out, r = new(6, 32), res.clone()
    fused_ops.fused_add_rms_norm_static_fp8_quant(out, x, r, w, s, EPS)
    assert torch.equal(r, summed)
    assert torch.equal(_bits(out), _bits(quant_ops.static_scaled_fp8_quant(add_normed, s)))

    out, scale, r = new(6, 32), new(6, 1, dtype=torch.float32), res.clone()
    fused_ops.fused_add_rms_norm_dynamic_per_token_fp8_quant(out, scale, x, r, w, EPS)
    q, qs = quant_ops.dynamic_per_token_scaled_fp8_quant(add_normed)
    assert torch.equal(r, summed) and torch.equal(_bits(out), _bits(q)) and torch.equal(scale, qs)

    gate_up = torch.randn(6, 64, generator=g, dtype=torch.bfloat16)
    out = new(6, 32)
    fused_ops.silu_and_mul_static_fp8_quant(out, gate_up, s)
    assert torch.equal(_bits(out), _bits(quant_ops.static_scaled_fp8_quant(norm_ops.silu_and_mul(gate_up), s)))

    register_group("test-quant-ops", _SingleRank())
    try:
        xr, r = x.clone(), res.clone()
        fused_ops.all_reduce_fused_add_rms_norm(xr, r, w, EPS, "test-quant-ops")
        assert torch.equal(xr, add_normed) and torch.equal(r, summed)
    finally:
        unregister_group("test-quant-ops")
