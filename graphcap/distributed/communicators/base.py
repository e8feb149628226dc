"""The interface every communicator implements, so the coordinator can hold them in one list."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Communicator(Protocol):
    """A way of running collectives. `name` keys the coordinator's per-path counters."""

    name: str

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the group, as a new tensor (never an alias of `x`: the custom op forbids it)."""
        ...

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order, as a new tensor."""
        ...

    def capture(self) -> AbstractContextManager[None]:
        """Prepare for collectives issued from captured graphs, for the duration of the context."""
        ...

    def replay(self) -> AbstractContextManager[None]:
        """Serve collectives the way captured graphs issue them, without re-preparing: for graphs that
        run Python at replay (CPU compiled callables)."""
        ...

    def close(self) -> None:
        """Release what the communicator holds; safe to call twice."""
        ...
