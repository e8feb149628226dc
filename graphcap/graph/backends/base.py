"""The contract between runners and backends."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

Replay = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


class GraphBackend(Protocol):
    """A backend whose captured code leaves attention eager (breakable) also sets
    `runs_attention_eagerly = True`; its replay then takes the live batch's metadata as a second argument."""

    name: str

    def capture(
        self,
        fn: Callable[..., torch.Tensor],
        args: tuple[torch.Tensor, ...],
        label: str,
        dynamic: Sequence[tuple[int, int]] = (),
    ) -> Replay:
        """Capture `fn(*args)`; `replay(current)` recomputes it for `current`, views of the same static
        storage that the runner refilled in place. `dynamic` lists (arg, dim) pairs whose size may change
        between replays, for backends that allow it (CPU compile); CUDA graphs need `current` to be the
        very views captured."""

    def memory_bytes(self) -> int:
        """Memory the captured graphs hold (CUDA graph pool); 0 where not measurable per backend."""
