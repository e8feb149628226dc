"""Collectives as custom ops (with fake implementations) so `torch.compile` traces through them and the
compilation layer can split graphs at, or fuse around, an all-reduce.

The op carries the group's name, not the group: the coordinator registered under that name decides at run
time which communicator path (eager or capture) serves the call.

Both ops are marked side-effectful: every rank must issue every collective, so a compiler must never drop
one whose result happens to be unused on one rank (that would hang the others).
"""

from __future__ import annotations

import torch
import torch.fx

_GROUPS: dict[str, object] = {}


def register_group(name: str, coordinator: object) -> None:
    _GROUPS[name] = coordinator


def unregister_group(name: str) -> None:
    _GROUPS.pop(name, None)


def get_group(name: str):
    """The coordinator registered under `name`; a clear error when distributed was never initialised."""
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(
            f"no process group is registered as {name!r} (registered: {sorted(_GROUPS)}); call init_distributed first"
        ) from None


@torch.library.custom_op("graphcap::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return get_group(group_name).all_reduce_impl(x)


@all_reduce.register_fake
def _all_reduce_fake(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("graphcap::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return get_group(group_name).all_gather_impl(x, dim)


@all_gather.register_fake
def _all_gather_fake(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    world = get_group(group_name).world_size
    shape = list(x.shape)
    shape[dim] *= world
    return x.new_empty(shape)


torch.fx.node.has_side_effect(torch.ops.graphcap.all_reduce.default)
torch.fx.node.has_side_effect(torch.ops.graphcap.all_gather.default)
