"""Weight-only block quantisation: linear layers that compute on 32-weight blocks (Q8_0, Q4_0, Q4_1).

A decode step on CPU reads every weight once, so its time is the bytes of the weights over memory
bandwidth; blocks of 4.5-8.5 bits per weight instead of 32 are what let it go faster, and graphcap's C++
kernels (`ops.gguf_kernels`) compute on them directly. The blocks come from one of two places:

* `gguf`: a GGUF file's own blocks, taken as stored (the default for a quantised GGUF on CPU), so the model
  computes on exactly the numbers the user's file holds;
* `int8` / `int4`: a float checkpoint quantised when loaded, to Q8_0 (a scale per 32 weights) or Q4_1
  (a scale and a minimum per 32 weights), the formats GGUF users know.

Merged layers (qkv, gate_up) join their parts' blocks row-wise: each output row is its own run of blocks.
Parts the kernels cannot run (K-quants, or a mix of types in one merged layer) are converted to Q8_0 from
their dequantised values, which loses nothing a 4-6 bit source had, and the load reports it in one line.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from graphcap.checkpoints.gguf import QuantizedBlocks
from graphcap.errors import UserError
from graphcap.ops import cpu_kernels
from graphcap.ops.gguf_kernels import (
    GEMM_MIN_ROWS,
    SUPPORTED_TYPES,
    TYPE_CODES,
    check_blocks,
    dequantize,
    gguf_linear,
    quantize,
)

if TYPE_CHECKING:
    from graphcap.layers.linear import LinearBase

BLOCK = 32
TARGETS = {"int8": "Q8_0", "int4": "Q4_1"}  # --quantization name -> block type a float weight becomes
FALLBACK_TYPE = "Q8_0"  # what blocks of a type the kernels lack become


class BlockQuantLinearMethod:
    """One layer's blocks: taken from the checkpoint (`target=None`) or made from its float weight."""

    def __init__(self, target: str | None, conversions: Counter) -> None:
        self.target = target
        self.conversions = conversions  # shared by a model's layers: "Q6_K -> Q8_0" -> tensors
        self.parts: dict[str | int | None, torch.Tensor | QuantizedBlocks] = {}
        self.qtype: str | None = None  # None: the layer computes in float (its checkpoint tensors were float)
        self.kernel = False  # whether graphcap's C++ op runs the blocks (else the torch formulation)

    def create_weights(self, layer: "LinearBase", in_features: int, out_features: int, dtype: torch.dtype) -> None:
        if in_features % BLOCK:
            raise UserError(f"a {in_features}-wide linear layer cannot hold {BLOCK}-weight blocks; "
                            "load this model with --quantization none")
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        if self.target is not None:
            layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
            return
        if layer.tp_size > 1:
            raise UserError("a GGUF's quantised blocks run with tp_size 1; for tensor parallelism load the "
                            "model with --quantization none")
        layer.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        layer.weight.takes_blocks = True

    def weight_loader(self, layer: "LinearBase"):
        """The loader for a GGUF's parts (kept until all arrived); float targets use the layer's own."""
        if self.target is not None:
            return layer.weight_loader

        def load_part(param: nn.Parameter, loaded, shard_id=None) -> None:
            self.parts[shard_id] = loaded

        return load_part

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        if self.target is not None:
            self._set_blocks(layer, quantize(layer.weight.data.float(), self.target), self.target)
            return
        parts = [self.parts[key] for key in sorted(self.parts, key=_shard_order)]
        self.parts = {}
        types = {p.ggml_type if isinstance(p, QuantizedBlocks) else "float" for p in parts}
        if types == {"float"}:
            layer.weight = nn.Parameter(torch.cat(parts).to(self.dtype), requires_grad=False)
            return
        (qtype,) = types if len(types) == 1 else (None,)
        if qtype in SUPPORTED_TYPES:
            self._set_blocks(layer, torch.cat([p.data for p in parts]).contiguous(), qtype)
            return
        floats = [p.dequantize() if isinstance(p, QuantizedBlocks) else p.float() for p in parts]
        self.conversions[f"{'+'.join(sorted(types))} -> {FALLBACK_TYPE}"] += 1
        self._set_blocks(layer, quantize(torch.cat(floats), FALLBACK_TYPE), FALLBACK_TYPE)

    def _set_blocks(self, layer: "LinearBase", blocks: torch.Tensor, qtype: str) -> None:
        check_blocks(blocks, qtype, self.in_features)
        if blocks.shape[0] != self.out_features:
            raise UserError(f"{qtype} blocks of {blocks.shape[0]} rows for a layer of {self.out_features} outputs")
        self.qtype, self.kernel = qtype, cpu_kernels.available()
        layer.weight = nn.Parameter(blocks, requires_grad=False)

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The blocks were checked once, at load (`_set_blocks`), so eager steps call the C++ op directly:
        `gguf_linear`'s per-call checks cost 2.3 us of a 12 us call, and an eager SmolLM2 decode step makes
        121 of them (compiled graphs trace the checks away either way)."""
        if self.qtype is None:
            return F.linear(x, layer.weight, bias)
        if self.kernel:
            flat = x.reshape(-1, self.in_features).float()
            out = torch.ops.graphcap_cpu.gguf_linear(flat, layer.weight, TYPE_CODES[self.qtype], GEMM_MIN_ROWS)
            out = out.reshape(*x.shape[:-1], self.out_features)
        else:
            out = gguf_linear(x.float(), layer.weight, self.qtype, self.out_features)
        out = out.to(x.dtype)
        return out if bias is None else out + bias

    def float_weight(self, layer: "LinearBase") -> torch.Tensor:
        """The weight the blocks encode, for float references (verification's float64 copy of the model)."""
        if self.qtype is None:
            return layer.weight.data
        return dequantize(layer.weight.data, self.qtype, self.in_features)


def _shard_order(key: str | int | None) -> int:
    return {"q": 0, "k": 1, "v": 2, None: 0}.get(key, key)


class BlockQuantFactory:
    """Makes each layer's method; remembers the conversions of the whole model for one line of report."""

    def __init__(self, name: str) -> None:
        self.target = TARGETS.get(name)
        self.conversions: Counter = Counter()

    def __call__(self) -> BlockQuantLinearMethod:
        return BlockQuantLinearMethod(self.target, self.conversions)

    def summary(self) -> str | None:
        if not self.conversions:
            return None
        return "block types the kernels lack were converted: " + ", ".join(
            f"{change} ({n} layers)" for change, n in sorted(self.conversions.items()))
