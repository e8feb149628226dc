"""FP8 W8A8 linear: float8_e4m3fn weights with one per-tensor scale, activations quantised per call.

Checkpoints are float (bf16/fp16/fp32); weights are quantised after loading, which keeps the weight loaders
of the tensor-parallel layers unchanged. A merged layer (qkv, gate_up) gets one scale for the whole merged
weight: its parts are quantised together, after all of them are loaded.

Activations use either
* "dynamic": one scale per token, computed at run time (robust, needs no calibration), or
* "static": one per-tensor scale fixed when weights are processed. Without calibration data the scale is
  `static_input_amax / FP8_MAX`, where `static_input_amax` (default 16.0) is the largest activation
  magnitude the scale represents without clipping. Post-norm Llama activations are O(1); values beyond it
  saturate at +-448 * scale. Checkpoints that ship a calibrated `input_scale` override the constant.

The matmul is `torch._scaled_mm(a, b, scale_a, scale_b)`, computing `(a * scale_a) @ (b * scale_b)`:
`a` is the [M, K] fp8 activation, `b` the [K, N] fp8 weight, which CUDA requires column-major, so the
weight is stored [N, K] row-major and passed as `weight.t()`. Scales are fp32: either both scalars
(tensor-wise) or scale_a [M, 1] with scale_b [1, N] (row-wise, used for per-token activations). The CPU
kernel in torch 2.13 accepts both layouts and both scale modes, and fp32/bf16/fp16 outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from graphcap.ops.quant_ops import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    dynamic_per_token_scaled_fp8_quant,
    static_scaled_fp8_quant,
)

if TYPE_CHECKING:
    from graphcap.layers.linear import LinearBase

ACTIVATION_SCHEMES = ("dynamic", "static")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scalar scale) with `weight ≈ q.float() * scale`, the scale set by the largest |w|."""
    w = weight.float()
    scale = (w.abs().amax() / FP8_MAX).clamp(min=MIN_SCALE)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Fp8LinearMethod:
    def __init__(self, activation_scheme: str = "dynamic", static_input_amax: float = 16.0) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation_scheme must be one of {ACTIVATION_SCHEMES}, got {activation_scheme!r}")
        self.activation_scheme = activation_scheme
        self.static_input_amax = static_input_amax

    def create_weights(self, layer: "LinearBase", in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """A float weight for the checkpoint; for static activations also `input_scale`, which a calibrated
        checkpoint may overwrite (merged layers keep the largest of their parts' scales)."""
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.output_dtype = dtype
        if self.activation_scheme == "static":
            default = torch.tensor(self.static_input_amax / FP8_MAX, dtype=torch.float32)
            layer.input_scale = nn.Parameter(default, requires_grad=False)
            layer.input_scale.weight_loader = _max_scale_loader()
            layer.input_scale.optional_in_checkpoint = True  # the calibration constant stands in when absent

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        qweight, scale = quantize_weight(layer.weight.data)
        layer.weight = nn.Parameter(qweight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        # the row-wise form _scaled_mm wants next to per-token activation scales
        layer.weight_scale_row = nn.Parameter(scale.expand(1, qweight.shape[0]).contiguous(), requires_grad=False)

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.activation_scheme == "static":
            q = static_scaled_fp8_quant(x2, layer.input_scale)
            scale_a, scale_b = layer.input_scale, layer.weight_scale
        else:
            q, scale_a = dynamic_per_token_scaled_fp8_quant(x2)
            scale_b = layer.weight_scale_row
        out = torch._scaled_mm(
            q, layer.weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=layer.output_dtype
        )
        return out.reshape(*lead, out.shape[-1])


def _max_scale_loader():
    """Loader for `input_scale`: the first checkpoint value replaces the default, later ones (the other
    parts of a merged layer) can only raise it, so no part's activations clip."""
    loaded = False

    def load(param: nn.Parameter, value: torch.Tensor, shard_id=None) -> None:
        nonlocal loaded
        value = value.to(torch.float32).reshape(())
        param.data.copy_(value if not loaded else torch.maximum(param.data, value))
        loaded = True

    return load
