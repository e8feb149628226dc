"""Whether this process was started as one rank of a torchrun-style launch.

torchrun (and `python -m torch.distributed.run`, and most cluster launchers) start every rank with the
same script and tell each who it is through RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. graphcap then
runs SPMD: every rank builds the engine, schedules the same requests and drives its own shard, instead of
spawning ranks of its own.
"""

from __future__ import annotations

import os

from graphcap.errors import UserError

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int | None:
    """WORLD_SIZE when an external launcher started this process as one of several ranks, else None."""
    if not all(name in os.environ for name in _REQUIRED):
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
    return world if world > 1 else None


def use_launched_ranks(tp_size: int) -> bool:
    """True when `tp_size` ranks should be the ones the external launcher started (SPMD), False when graphcap
    should spawn its own (no launcher) or run alone (tp_size=1: every launched rank serves on its own)."""
    world = launched_world_size()
    if world is None or tp_size == 1:
        return False
    if world != tp_size:
        raise UserError(
            f"this process is one of WORLD_SIZE={world} launched ranks but tp_size={tp_size}; "
            f"pass tp_size={world} (graphcap shards one model over all launched ranks), or start "
            f"{tp_size} ranks, or run without the launcher to let graphcap start its own"
        )
    return True
