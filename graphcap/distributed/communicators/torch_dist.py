"""Collectives on a `torch.distributed` process group: the eager path, and the fallback for every
message another communicator cannot take."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist


class TorchDistCommunicator:
    """gloo on CPU, NCCL on CUDA. Nothing to prepare for capture: NCCL calls are stream-capturable and
    gloo calls run on the host, so `capture()` and `replay()` are null contexts."""

    name = "torch_dist"

    def __init__(self, group: dist.ProcessGroup, world_size: int) -> None:
        self.group = group
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather into one tensor along dim 0 (one collective, no per-rank list), then move the rank axis
        next to `dim` so the result equals `torch.cat(parts, dim)`."""
        dim = dim % x.dim()
        src = x.contiguous()
        out = src.new_empty((self.world_size * src.shape[0], *src.shape[1:]))
        dist.all_gather_single(out, src, group=self.group)
        if dim == 0:
            return out
        stacked = out.view(self.world_size, *src.shape).movedim(0, dim)
        shape = list(src.shape)
        shape[dim] *= self.world_size
        return stacked.reshape(shape)

    def capture(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def replay(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        return None
