"""Tensor parallelism when an external launcher (torchrun) started the ranks: SPMD execution.

Every rank runs the same user script, so every rank holds a whole engine (scheduler, pages, sampler) and
its own shard of the model. They stay in lockstep because they schedule the same requests the same way
and sample the same tokens: the logits are bitwise identical on every rank by construction (the LM head's
vocabulary shards are all-gathered, and the all-reduces before it give every rank the same sum), so greedy
and seeded sampling agree without any exchange. Once per `generate`, the ranks compare the requests they
were given (a clear error when a rank was handed different prompts) and take rank 0's seed for requests
that have none, so unseeded random sampling agrees too. The decode step itself carries no extra collective.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import torch
import torch.distributed as dist

from graphcap.config import EngineConfig
from graphcap.distributed.coordinator import destroy_distributed
from graphcap.distributed.launcher import RankFailure
from graphcap.errors import UserError
from graphcap.batch.forward_batch import ForwardMode
from graphcap.executor.loader import ModelSource
from graphcap.executor.setup import build_local_runner
from graphcap.executor.tp_executor import COLLECTIVE_TIMEOUT_S, join_group


def join_launched_group(cfg: EngineConfig):
    """Join the world the launcher described (its environment names the ranks) and check every rank was
    configured alike."""
    return join_group(cfg, COLLECTIVE_TIMEOUT_S)


def _gather(coordinator, value: Any) -> list[Any]:
    values: list[Any] = [None] * coordinator.world_size
    dist.all_gather_object(values, value, group=coordinator.cpu_group)
    return values



class SPMDExecutor:
    """This rank's share of a launched TP group, with the executor interface the engine drives."""

    def __init__(self, cfg: EngineConfig, source: ModelSource) -> None:
        self.coordinator = join_launched_group(cfg)
        self.rank = self.coordinator.rank_in_group
        self.world_size = self.coordinator.world_size
        try:
            self.runner = build_local_runner(cfg, source)
        except BaseException:
            destroy_distributed()
            raise
        self.load_seconds = self.runner.load_seconds

    @property
    def pool(self):
        return self.runner.pool

    def execute(
        self, mode: ForwardMode, token_ids: list[list[int]], prefix_lens: list[int], page_tables: list[list[int]]
    ) -> torch.Tensor:
        return self.runner.execute(mode, token_ids, prefix_lens, page_tables)

    def agree_on_requests(self, requests: Any) -> int:
        """Rank 0's seed for the requests that carry none, after checking every rank was given the same
        requests (else a UserError on every rank: they would schedule different batches and block in each
        other's collectives). One collective per `generate`."""
        digest = hashlib.sha256(pickle.dumps(requests)).hexdigest()
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from rank 0's global RNG, as an unseeded draw would be
        try:
            entries = _gather(self.coordinator, (digest, seed))
        except RuntimeError as e:  # the collective timed out or a peer left
            raise RankFailure(
                f"rank {self.rank}: the other launched ranks did not join generate() within {COLLECTIVE_TIMEOUT_S:.0f} s "
                f"({type(e).__name__}); under torchrun every rank must call generate() with the same requests"
            ) from None
        if len({d for d, _ in entries}) != 1:
            raise UserError("launched ranks called generate() with different prompts or sampling parameters; "
                            "every rank must pass the same requests")
        return entries[0][1]

    def stats(self) -> dict:
        """This rank's counters (no collective, so any one rank may ask)."""
        out = self.runner.stats()
        out["tp"] = {"world_size": self.world_size, "rank": self.rank, "launcher": "external",
                     "communicators": [self.coordinator.stats()]}
        return out

    def shutdown(self) -> None:
        self.runner.shutdown()
        destroy_distributed()
