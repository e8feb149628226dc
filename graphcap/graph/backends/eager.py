"""The trivial backend: replay is a plain call. Lets runner mechanics be tested without compiling."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from graphcap.graph.backends.base import Replay


class EagerBackend:
    name = "eager"

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        return lambda current: fn(*current)

    def memory_bytes(self) -> int:
        return 0
