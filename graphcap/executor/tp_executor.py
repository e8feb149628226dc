"""Tensor-parallel execution driven from the API process.

The API process keeps the scheduler, the page bookkeeping and the sampler; each rank holds one shard of
the model, its own KV cache of the same page layout, and its own captured graphs (captured inside the
TP group's `graph_capture()`, so collectives in graphs take the communicator's capture path). A step is
one broadcast of plain lists to every rank and rank 0's logits back.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable

import torch

from graphcap.common.digest import digest_of
from graphcap.config import EngineConfig
from graphcap.distributed.launcher import WorkerGroup
from graphcap.errors import UserError
from graphcap.batch.forward_batch import ForwardMode
from graphcap.executor.kv_cache import PagePool

if TYPE_CHECKING:
    from graphcap.distributed.coordinator import GroupCoordinator

STARTUP_TIMEOUT_S = 1800.0  # compiling every bucket on a small CPU takes minutes
STEP_TIMEOUT_S = 300.0
COLLECTIVE_TIMEOUT_S = 120.0


def config_digest(cfg: EngineConfig) -> str:
    """What every rank must agree on before it serves: engine config, torch version."""
    data = {"config": asdict(cfg), "torch": torch.__version__}
    return digest_of(data, length=64)


class TPExecutor:
    def __init__(self, cfg: EngineConfig, num_pages: int) -> None:
        self.world_size = cfg.tp_size
        self.group = WorkerGroup(cfg.tp_size, _worker_main, (cfg,))
        ready = self.group.gather(STARTUP_TIMEOUT_S)
        pages = {r["num_pages"] for r in ready}
        if pages != {num_pages}:
            self.shutdown()
            raise RuntimeError(f"ranks built KV caches of {sorted(pages)} pages, expected {num_pages}")
        self.pool = PagePool(num_pages, cfg.page_size)
        self._kv_bytes = sum(r["kv_bytes"] for r in ready)
        self.load_seconds = max(r["load_seconds"] for r in ready)

    def execute(
        self, mode: ForwardMode, token_ids: list[list[int]], prefix_lens: list[int], page_tables: list[list[int]]
    ) -> torch.Tensor:
        self.group.broadcast(("execute", mode, token_ids, prefix_lens, page_tables))
        return self.group.gather(STEP_TIMEOUT_S)[0]

    def stats(self) -> dict:
        self.group.broadcast(("stats",))
        per_rank = self.group.gather(STEP_TIMEOUT_S)
        out = dict(per_rank[0])
        out["kv_cache"] = {"bytes": self._kv_bytes}
        out["tp"] = {"world_size": self.world_size, "communicators": [r["communicators"] for r in per_rank]}
        return out

    def shutdown(self) -> None:
        self.group.stop()


def join_group(cfg: EngineConfig, timeout_s: float = COLLECTIVE_TIMEOUT_S, **init_args: Any) -> "GroupCoordinator":
    """Join the TP group (gloo on CPU, NCCL on CUDA; `init_args` name the ranks and rendezvous, or are empty
    under torchrun, whose environment says it all) and check that every rank was given the same
    configuration: ranks that disagree would shard or capture differently and hang in a collective."""
    from graphcap.distributed.coordinator import destroy_distributed, init_distributed

    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    coordinator = init_distributed(backend=backend, timeout_s=timeout_s, **init_args)
    digests: list[str | None] = [None] * coordinator.world_size
    torch.distributed.all_gather_object(digests, config_digest(cfg), group=coordinator.cpu_group)
    if len(set(digests)) != 1:
        destroy_distributed()
        raise UserError("tensor-parallel ranks were started with different configurations")
    return coordinator


def join_tp_group(rank: int, world_size: int, port: int, cfg: EngineConfig) -> "GroupCoordinator":
    """Join the group a `WorkerGroup` started on this host."""
    torch.set_num_threads(cfg.intra_op_threads())  # ranks share this host's cores
    return join_group(cfg, world_size=world_size, rank=rank, init_method=f"tcp://127.0.0.1:{port}")


RankStart = Callable[[EngineConfig, "GroupCoordinator"], tuple[dict, dict[str, Callable[..., Any]]]]


def run_rank(rank: int, world_size: int, port: int, conn, cfg: EngineConfig, start: RankStart) -> None:
    """The life of one spawned rank: join the group, build with `start` (which returns the "ready" report and
    the commands this rank serves by name), answer commands until "shutdown". Every failure reaches the API
    process as ("error", kind, text), so `WorkerGroup.gather` raises instead of waiting on a silent rank."""
    from graphcap.distributed.coordinator import destroy_distributed

    try:
        coordinator = join_tp_group(rank, world_size, port, cfg)
        ready, commands = start(cfg, coordinator)
        conn.send(("ready", ready))
        while True:
            name, *args = conn.recv()
            command = commands.get(name)
            if command is None:  # "shutdown"
                break
            conn.send(("ok", command(*args)))
    except UserError as e:
        _report(conn, "user", str(e))
    except Exception as e:  # any failure on a rank must reach the API process, not die silently
        _report(conn, "internal", f"{type(e).__name__}: {e}")
    finally:
        destroy_distributed()
        conn.close()


def _worker_main(rank: int, world_size: int, port: int, conn, cfg: EngineConfig) -> None:
    """A decoder rank; module-level so the spawn start method can pickle it by name."""
    run_rank(rank, world_size, port, conn, cfg, _start_decoder)


def _start_decoder(cfg: EngineConfig, coordinator: "GroupCoordinator") -> tuple[dict, dict[str, Callable[..., Any]]]:
    """Build and capture this rank's shard; steps return logits from rank 0 only (the others' are equal)."""
    from graphcap.executor.loader import resolve_source
    from graphcap.executor.setup import build_local_runner

    runner = build_local_runner(cfg, resolve_source(cfg.model))
    leader = coordinator.rank_in_group == 0

    def execute(*step) -> torch.Tensor | None:
        logits = runner.execute(*step)
        return logits if leader else None

    def stats() -> dict:
        out = runner.stats()
        out["communicators"] = coordinator.stats()
        return out

    ready = {"num_pages": runner.pool.num_pages, "kv_bytes": runner.kv_cache.nbytes(),
             "load_seconds": runner.load_seconds}
    return ready, {"execute": execute, "stats": stats}


def _report(conn, kind: str, text: str) -> None:
    try:
        conn.send(("error", kind, text))
    except (BrokenPipeError, OSError):
        pass
