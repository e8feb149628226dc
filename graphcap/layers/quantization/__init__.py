"""Quantisation methods for linear layers, and the lookup from a `--quantization` name to one."""

from __future__ import annotations

from typing import Callable

from graphcap.errors import UserError
from graphcap.layers.quantization.fp8 import Fp8LinearMethod

__all__ = ["Fp8LinearMethod", "quant_method_factory"]

_METHODS: dict[str, Callable[[], object]] = {
    "fp8": lambda: Fp8LinearMethod("dynamic"),
    "fp8-static": lambda: Fp8LinearMethod("static"),
}


def quant_method_factory(name: str | None) -> Callable[[], object | None]:
    """A zero-argument factory of per-layer quant methods for `LlamaForCausalLM(cfg, dtype, factory)`.

    A factory rather than one instance because each layer keeps its own state (scales) in its method.
    None or "none" gives unquantised layers.
    """
    if name is None or name == "none":
        return lambda: None
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown quantization {name!r}; known: none, {', '.join(sorted(_METHODS))}") from None
