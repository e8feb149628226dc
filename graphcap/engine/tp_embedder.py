"""Tensor-parallel encoders (BERT, ViT) on ranks graphcap starts itself, driven from the API process.

`LLM(model=<encoder>, tp_size=N)` in a process without a TP group starts N ranks with the decoder's launcher
(`WorkerGroup`, the same start-up and failure reporting as `TPExecutor`). Each rank joins the group and builds
an ordinary `Embedder`, which then finds the group installed: "tp" shards the encoder and captures inside the
group's communicator capture, "dp" runs the whole encoder. Sharded, every rank embeds the same inputs (a
sharded forward needs every rank) and rank 0's vectors come back; data-parallel, each rank embeds its own
contiguous share and the shares come back in order.

Inputs are checked here, before any rank sees them: a rank that raises ends the whole group (that is how a
failure stays bounded in time), so a caller's mistake must never get that far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from graphcap.config import EngineConfig
from graphcap.distributed.coordinator import destroy_distributed
from graphcap.distributed.env import use_launched_ranks
from graphcap.distributed.launcher import WorkerGroup
from graphcap.distributed.parallel_state import get_tp_group
from graphcap.engine.embedder import Embedder, check_inputs
from graphcap.executor.spmd_executor import join_launched_group
from graphcap.executor.tp_executor import STARTUP_TIMEOUT_S, STEP_TIMEOUT_S, run_rank

if TYPE_CHECKING:
    from graphcap.distributed.coordinator import GroupCoordinator

# One embed call has no size bound, so it gets no tight deadline. Failures stay bounded regardless: a dead rank
# is seen at once through its process sentinel, and a stuck collective times out on the ranks themselves.
EMBED_TIMEOUT_S = 3600.0


def make_embedder(cfg: EngineConfig) -> Embedder | TPEmbedder:
    """The encoder engine for `LLM`. For tp_size > 1 in a process without a TP group: join the launched group
    when an external launcher (torchrun) started this process as one of its ranks, else start ranks of our own.
    Otherwise an in-process `Embedder`, which joins the group installed here or refuses."""
    if cfg.tp_size > 1 and get_tp_group() is None:
        return LaunchedEmbedder(cfg) if use_launched_ranks(cfg.tp_size) else TPEmbedder(cfg)
    return Embedder(cfg)


class LaunchedEmbedder(Embedder):
    """An `Embedder` on one rank of an external launch (SPMD): it joins the launched group first and leaves
    it at shutdown. Every rank must embed the same inputs, as with launched decoders."""

    def __init__(self, cfg: EngineConfig) -> None:
        join_launched_group(cfg)
        try:
            super().__init__(cfg)
        except BaseException:
            destroy_distributed()
            raise

    def shutdown(self) -> None:
        destroy_distributed()


class TPEmbedder:
    """`Embedder`'s interface (embed, stats, shutdown, load_seconds) over a group of spawned ranks."""

    rank = 0  # the API process drives the ranks and holds the results

    def __init__(self, cfg: EngineConfig) -> None:
        self.world_size = cfg.tp_size
        self.group = WorkerGroup(cfg.tp_size, _worker_main, (cfg,))
        ready = self.group.gather(STARTUP_TIMEOUT_S)
        self.inputs = ready[0]["inputs"]
        self.data_parallel = cfg.encoder_graph().parallel == "dp"
        self.load_seconds = max(r["load_seconds"] for r in ready)

    def embed(self, texts=None, images=None) -> list[list[float]]:
        """Sharded ("tp"): every rank embeds all inputs and rank 0's vectors come back. Data-parallel ("dp"):
        each rank embeds a contiguous share of the inputs and the shares come back in order."""
        texts, pixels = check_inputs(self.inputs, texts, images)
        if pixels is not None:  # sending a tensor moves its storage into shared memory, in place: not the caller's
            pixels = pixels.clone()
        if not self.data_parallel:
            self.group.broadcast(("embed", texts, pixels))
            return self.group.gather(EMBED_TIMEOUT_S)[0]
        items = texts if texts is not None else pixels
        base, extra = divmod(len(items), self.world_size)
        bounds = [0]
        for rank in range(self.world_size):  # the first `extra` ranks take one more: few inputs go to rank 0
            bounds.append(bounds[-1] + base + (rank < extra))
        shares = [items[bounds[r]:bounds[r + 1]] for r in range(self.world_size)]
        self.group.scatter([("embed", s, None) if texts is not None else ("embed", None, s) for s in shares])
        return [v for share in self.group.gather(EMBED_TIMEOUT_S) for v in share]

    def stats(self) -> dict:
        """Rank 0's encoder stats, and every rank's collectives by communicator under "tp"."""
        self.group.broadcast(("stats",))
        per_rank = self.group.gather(STEP_TIMEOUT_S)
        out = {k: v for k, v in per_rank[0].items() if k != "communicators"}
        out["tp"] = {"world_size": self.world_size, "communicators": [r["communicators"] for r in per_rank],
                     "inputs": [r["encoder"]["inputs"] for r in per_rank]}
        return out

    def shutdown(self) -> None:
        self.group.stop()


def _worker_main(rank: int, world_size: int, port: int, conn, cfg: EngineConfig) -> None:
    """An encoder rank; module-level so the spawn start method can pickle it by name."""
    run_rank(rank, world_size, port, conn, cfg, _start_encoder)


def _start_encoder(cfg: EngineConfig, coordinator: "GroupCoordinator") -> tuple[dict, dict[str, Callable[..., Any]]]:
    """Build (and capture) this rank's encoder. Sharded, only rank 0 sends vectors back (the others' are the
    same); data-parallel, every rank sends the vectors of its own share, which may be empty."""
    embedder = Embedder(cfg)
    replies = coordinator.rank_in_group == 0 or embedder.parallel == "dp"

    def embed(texts: list[str] | None, pixels: torch.Tensor | None) -> list[list[float]] | None:
        if not len(texts if texts is not None else pixels):
            return []
        vectors = embedder.embed(texts=texts, images=pixels)
        return vectors if replies else None

    def stats() -> dict:
        out = embedder.stats()
        out["communicators"] = coordinator.stats()
        return out

    ready = {"inputs": embedder.inputs, "load_seconds": embedder.load_seconds}
    return ready, {"embed": embed, "stats": stats}
