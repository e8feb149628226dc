"""SiLU-and-mul, the gated activation of Llama-family MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphcap.layers.custom_op import CustomOp


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(CustomOp):
    name = "silu_and_mul"

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_ref(x)

    def forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        from graphcap.ops import norm_ops

        return norm_ops.silu_and_mul(x)
