"""FP8 W8A8 linear against float references, and the `torch._scaled_mm` facts it relies on on CPU.

Tolerances: against the same matmul on the *dequantised* operands the only differences are fp32 summation
order, so the check is tight (1e-5 relative). Against the unquantised float matmul the error is the fp8
rounding of weights and activations (each <= 2^-4 relative per element, averaging out in dot products),
so the check is loose: relative Frobenius error below 8%.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphcap.errors import UserError
from graphcap.layers.linear import ReplicatedLinear
from graphcap.layers.quantization import Fp8LinearMethod, quant_method_factory
from graphcap.ops.quant_ops import FP8_DTYPE, dynamic_per_token_fp8_quant_ref, static_fp8_quant_ref


def _layer(scheme: str, dtype: torch.dtype, bias: bool = False, seed: int = 0) -> tuple[ReplicatedLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = ReplicatedLinear(48, 40, bias, dtype, Fp8LinearMethod(scheme, static_input_amax=6.0))
    w = (torch.randn(40, 48, generator=g) * 0.1).to(dtype)
    layer.weight.data.copy_(w)
    if bias:
        layer.bias.data.copy_(torch.randn(40, generator=g).to(dtype))
    layer.quant_method.process_weights_after_loading(layer)
    return layer, w


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_dequantised_and_float_references(scheme: str, dtype: torch.dtype) -> None:
    layer, w = _layer(scheme, dtype, bias=True)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.shape == (40, 48)
    x = torch.randn(2, 5, 48).to(dtype)
    y = layer(x)
    assert y.shape == (2, 5, 40) and y.dtype == dtype

    x2 = x.reshape(-1, 48)
    if scheme == "static":
        xq, xs = static_fp8_quant_ref(x2, layer.input_scale), layer.input_scale
    else:
        xq, xs = dynamic_per_token_fp8_quant_ref(x2)
    deq = (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale).t() + layer.bias.float()
    torch.testing.assert_close(y.reshape(-1, 40), deq.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert _rel_err(y, F.linear(x.float(), w.float(), layer.bias.float())) < 0.08


def test_static_input_scale_takes_checkpoint_value_and_largest_merged_part() -> None:
    layer, _ = _layer("static", torch.float32)
    loader = layer.input_scale.weight_loader
    assert layer.input_scale.item() == pytest.approx(6.0 / 448)
    loader(layer.input_scale, torch.tensor([0.001]), "q")
    assert layer.input_scale.item() == pytest.approx(0.001)
    loader(layer.input_scale, torch.tensor([0.003]), "k")
    loader(layer.input_scale, torch.tensor([0.002]), "v")
    assert layer.input_scale.item() == pytest.approx(0.003)


def test_scaled_mm_on_cpu_accepts_both_weight_layouts_and_rowwise_scales() -> None:
    """The facts fp8.py documents: CPU takes a row- or column-major B; row-wise needs [M,1] x [1,N] scales."""
    a = torch.randn(4, 32).to(FP8_DTYPE)
    w = torch.randn(16, 32).to(FP8_DTYPE)
    one = torch.tensor(1.0)
    col_major = torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    row_major = torch._scaled_mm(a, w.t().contiguous(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    assert torch.equal(col_major, row_major)
    torch.testing.assert_close(col_major, a.float() @ w.float().t())
    sa, sb = torch.rand(4, 1) + 0.5, torch.rand(1, 16) + 0.5
    rowwise = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    torch.testing.assert_close(rowwise, col_major * sa * sb)
    with pytest.raises(Exception, match="scal"):
        torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=one, out_dtype=torch.float32)


def test_quant_method_factory() -> None:
    method = quant_method_factory("fp8")()
    assert isinstance(method, Fp8LinearMethod) and method.activation_scheme == "dynamic"
    assert quant_method_factory("fp8")() is not method  # one method (and its state) per layer
    assert quant_method_factory("fp8-static")().activation_scheme == "static"
    assert quant_method_factory(None)() is None
    with pytest.raises(UserError, match="unknown quantization"):
        quant_method_factory("int3")
    with pytest.raises(ValueError):
        Fp8LinearMethod("per-channel")
