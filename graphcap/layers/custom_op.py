"""Layers with two implementations: plain torch (the compiler fuses it) and a registered custom op
(the compilation layer's passes pattern-match it, e.g. RMSNorm followed by FP8 quantisation).

Which one runs is decided when the layer is built, from `enabled_custom_ops`, never per call.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

_ENABLED: frozenset[str] = frozenset()


@contextlib.contextmanager
def enabled_custom_ops(names: frozenset[str] | set[str]) -> Iterator[None]:
    """Build layers inside this context to route the named layer kinds through their custom ops."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, frozenset(names)
    try:
        yield
    finally:
        _ENABLED = prev


class CustomOp(nn.Module):
    name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.use_custom_op = self.name in _ENABLED or "all" in _ENABLED

    def forward(self, *args, **kwargs):
        if self.use_custom_op:
            return self.forward_custom(*args, **kwargs)
        return self.forward_native(*args, **kwargs)

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError

    def forward_custom(self, *args, **kwargs):
        return self.forward_native(*args, **kwargs)
