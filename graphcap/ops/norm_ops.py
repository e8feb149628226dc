"""RMSNorm, fused-add RMSNorm and SiLU-and-mul as in-place/out-style custom ops.

The ops write into caller-provided buffers (as production kernels do) so that under `torch.compile` they
appear as `auto_functionalized` nodes: the fusion passes match those, and fix-functionalization turns them
back into in-place calls. The Python wrappers are functional (they never mutate their arguments), so a layer
built with custom ops has exactly the semantics, and the bits, of its `forward_native`.
"""

from __future__ import annotations

import torch

from graphcap.ops.reference import rms_norm_ref, silu_and_mul_ref


@torch.library.custom_op("graphcap::rms_norm", mutates_args=("out",))
def _rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    out.copy_(rms_norm_ref(x, weight, eps))


@_rms_norm.register_fake
def _rms_norm_fake(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    return None


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), in the same order of operations as `RMSNorm.forward_native`."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


@torch.library.custom_op("graphcap::fused_add_rms_norm", mutates_args=("x", "residual"))
def _fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    normed, summed = fused_add_rms_norm_ref(x, residual, weight, eps)
    residual.copy_(summed)
    x.copy_(normed)


@_fused_add_rms_norm.register_fake
def _fused_add_rms_norm_fake(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    return None


@torch.library.custom_op("graphcap::silu_and_mul", mutates_args=("out",))
def _silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    out.copy_(silu_and_mul_ref(x))


@_silu_and_mul.register_fake
def _silu_and_mul_fake(out: torch.Tensor, x: torch.Tensor) -> None:
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops.graphcap.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual), x + residual) without touching the caller's tensors.

    The op itself works in place; the copies made here vanish under `torch.compile` (Inductor drops the
    clones and fix-functionalization reuses dead buffers), and in eager they keep `forward_custom` free of
    side effects the native path does not have.
    """
    x = x.clone()
    residual = residual.clone()
    torch.ops.graphcap.fused_add_rms_norm(x, residual, weight, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    torch.ops.graphcap.silu_and_mul(out, x)
    return out
