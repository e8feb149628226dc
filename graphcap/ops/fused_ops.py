"""Fused custom ops the compilation passes substitute for sequences of graphcap ops.

Each reference implementation composes exactly the `*_ref` functions of the unfused ops, so a fused graph
equals the unfused one bitwise on CPU; a device kernel may replace a reference later without changing the
op's schema. Like the unfused ops they are out-style/in-place, so after fusion fix-functionalization can
turn them into direct calls too.
"""

from __future__ import annotations

import torch

import graphcap.distributed.ops  # noqa: F401  (registers graphcap::all_reduce, which the fallback calls)
from graphcap.ops.reference import rms_norm_ref, silu_and_mul_ref
from graphcap.ops.norm_ops import fused_add_rms_norm_ref
from graphcap.ops.quant_ops import dynamic_per_token_fp8_quant_ref, static_fp8_quant_ref


@torch.library.custom_op("graphcap::rms_norm_static_fp8_quant", mutates_args=("out",))
def rms_norm_static_fp8_quant(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> None:
    out.copy_(static_fp8_quant_ref(rms_norm_ref(x, weight, eps), scale))


@rms_norm_static_fp8_quant.register_fake
def _(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float) -> None:
    return None


@torch.library.custom_op("graphcap::rms_norm_dynamic_per_token_fp8_quant", mutates_args=("out", "scale"))
def rms_norm_dynamic_per_token_fp8_quant(
    out: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    q, s = dynamic_per_token_fp8_quant_ref(rms_norm_ref(x, weight, eps))
    out.copy_(q)
    scale.copy_(s)


@rms_norm_dynamic_per_token_fp8_quant.register_fake
def _(out: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    return None


@torch.library.custom_op("graphcap::fused_add_rms_norm_static_fp8_quant", mutates_args=("out", "residual"))
def fused_add_rms_norm_static_fp8_quant(
    out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float
) -> None:
    """residual <- x + residual; out <- quant(norm(x + residual)). `x` is read only: its normed value is
    never materialised, which is the point of the fusion."""
    normed, summed = fused_add_rms_norm_ref(x, residual, weight, eps)
    residual.copy_(summed)
    out.copy_(static_fp8_quant_ref(normed, scale))


@fused_add_rms_norm_static_fp8_quant.register_fake
def _(out, x, residual, weight, scale, eps) -> None:
    return None


@torch.library.custom_op(
    "graphcap::fused_add_rms_norm_dynamic_per_token_fp8_quant", mutates_args=("out", "scale", "residual")
)
def fused_add_rms_norm_dynamic_per_token_fp8_quant(
    out: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    normed, summed = fused_add_rms_norm_ref(x, residual, weight, eps)
    q, s = dynamic_per_token_fp8_quant_ref(normed)
    residual.copy_(summed)
    out.copy_(q)
    scale.copy_(s)


@fused_add_rms_norm_dynamic_per_token_fp8_quant.register_fake
def _(out, scale, x, residual, weight, eps) -> None:
    return None


@torch.library.custom_op("graphcap::silu_and_mul_static_fp8_quant", mutates_args=("out",))
def silu_and_mul_static_fp8_quant(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
    out.copy_(static_fp8_quant_ref(silu_and_mul_ref(x), scale))


@silu_and_mul_static_fp8_quant.register_fake
def _(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
    return None


@torch.library.custom_op("graphcap::all_reduce_fused_add_rms_norm", mutates_args=("x", "residual"))
def all_reduce_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> None:
    """x <- norm(all_reduce(x) + residual); residual <- all_reduce(x) + residual.

    This fallback is the unfused sequence through `graphcap::all_reduce`, so it is correct on every
    communicator; a communicator with a one-shot fused kernel can override the op's device implementation.
    """
    reduced = torch.ops.graphcap.all_reduce(x, group_name)
    normed, summed = fused_add_rms_norm_ref(reduced, residual, weight, eps)
    residual.copy_(summed)
    x.copy_(normed)


@all_reduce_fused_add_rms_norm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str) -> None:
    return None
