"""SiLU-and-mul, the gated activation of Llama-family MLPs."""

from __future__ import annotations

import torch

from graphcap.layers.custom_op import CustomOp
from graphcap.ops.reference import silu_and_mul_ref


class SiluAndMul(CustomOp):
    name = "silu_and_mul"

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_ref(x)

    def forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        from graphcap.ops import norm_ops

        return norm_ops.silu_and_mul(x)
