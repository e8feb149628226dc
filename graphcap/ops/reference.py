"""The reference math of the ops: what the layers run natively and what each custom op must equal.

It lives here, under the ops, so that layers (which call the ops) and the ops' own fallbacks share one
definition without the ops importing the layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 or wider (the HF formula)."""
    if x.dtype in (torch.float32, torch.float64):  # no conversions: the hot path, and float64 references
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
