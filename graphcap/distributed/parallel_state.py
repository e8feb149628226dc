"""Which tensor-parallel rank this process is, and the collectives TP layers call.

With no group initialised the process is rank 0 of 1 and every collective is the identity, so the same
layer code serves single-process and tensor-parallel runs.
"""

from __future__ import annotations

import contextlib

import torch

_TP_GROUP = None


def set_tp_group(group) -> None:
    """Install the coordinator of the tensor-parallel group (None returns to single-process)."""
    global _TP_GROUP
    _TP_GROUP = group


def get_tp_group():
    return _TP_GROUP


def get_tp_rank() -> int:
    return 0 if _TP_GROUP is None else _TP_GROUP.rank_in_group


def get_tp_size() -> int:
    return 1 if _TP_GROUP is None else _TP_GROUP.world_size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP_GROUP is None or _TP_GROUP.world_size == 1:
        return x
    return _TP_GROUP.all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP_GROUP is None or _TP_GROUP.world_size == 1:
        return x
    return _TP_GROUP.all_gather(x, dim)


def graph_capture():
    """The TP group's capture context (enters every communicator's capture mode), or a null context
    when there is no group, so runners always capture inside it."""
    if _TP_GROUP is None:
        return contextlib.nullcontext()
    return _TP_GROUP.graph_capture()


def graph_replay():
    """The context graphs replay in: collectives inside CPU-compiled graphs take their capture path
    (shared memory) here; a null context without a group."""
    if _TP_GROUP is None:
        return contextlib.nullcontext()
    return _TP_GROUP.graph_replay()
