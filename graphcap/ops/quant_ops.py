"""FP8 (e4m3fn) activation quantisation: static per-tensor scale and dynamic per-token scale.

`*_ref` functions are the single source of the numbers: the custom ops, the fused ops in `fused_ops` and the
tests all call them, so a fused graph reproduces an unfused one bitwise. Scales are fp32 and mean
`x ≈ q.float() * scale` (the convention `torch._scaled_mm` consumes).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# Floor for dynamic scales: an all-zero row must not yield scale 0 (division by zero); 1/(max*512) is the
# smallest scale that still lets the fp8 subnormals of such a row round to zero cleanly.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def static_fp8_quant_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dynamic_per_token_fp8_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q, scale) with one fp32 scale per row (shape [..., 1]) so each token uses the full fp8 range."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@torch.library.custom_op("graphcap::static_scaled_fp8_quant", mutates_args=("out",))
def _static_scaled_fp8_quant(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
    out.copy_(static_fp8_quant_ref(x, scale))


@_static_scaled_fp8_quant.register_fake
def _static_scaled_fp8_quant_fake(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
    return None


@torch.library.custom_op("graphcap::dynamic_per_token_scaled_fp8_quant", mutates_args=("out", "scale"))
def _dynamic_per_token_scaled_fp8_quant(out: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> None:
    q, s = dynamic_per_token_fp8_quant_ref(x)
    out.copy_(q)
    scale.copy_(s)


@_dynamic_per_token_scaled_fp8_quant.register_fake
def _dynamic_per_token_scaled_fp8_quant_fake(out: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> None:
    return None


def static_scaled_fp8_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    torch.ops.graphcap.static_scaled_fp8_quant(out, x, scale)
    return out


def dynamic_per_token_scaled_fp8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    torch.ops.graphcap.dynamic_per_token_scaled_fp8_quant(out, scale, x)
    return out, scale
