"""Quantisation methods for linear layers, and the lookup from a `--quantization` name to one."""

from __future__ import annotations

from typing import Callable

from graphcap.errors import UserError
from graphcap.layers.quantization.block_quant import BlockQuantFactory, BlockQuantLinearMethod
from graphcap.layers.quantization.fp8 import Fp8LinearMethod

__all__ = ["BlockQuantLinearMethod", "Fp8LinearMethod", "KNOWN", "quant_method_factory"]

_METHODS: dict[str, Callable[[], Callable[[], object]]] = {
    "fp8": lambda: lambda: Fp8LinearMethod("dynamic"),
    "fp8-static": lambda: lambda: Fp8LinearMethod("static"),
    "gguf": lambda: BlockQuantFactory("gguf"),
    "int8": lambda: BlockQuantFactory("int8"),
    "int4": lambda: BlockQuantFactory("int4"),
}
KNOWN = ("none", *sorted(_METHODS))


def quant_method_factory(name: str | None) -> Callable[[], object | None]:
    """A zero-argument factory of per-layer quant methods for `LlamaForCausalLM(cfg, dtype, factory)`.

    A factory rather than one instance because each layer keeps its own state (scales, blocks) in its
    method. None or "none" gives unquantised layers.
    """
    if name is None or name == "none":
        return lambda: None
    try:
        return _METHODS[name]()
    except KeyError:
        raise UserError(f"unknown quantization {name!r}; known: {', '.join(KNOWN)}") from None
