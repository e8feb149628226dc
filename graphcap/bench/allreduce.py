"""All-reduce latency of the shared-memory path against gloo, side by side in one run on the same ranks.

Both paths are timed through `GroupCoordinator.all_reduce` (the custom op layers call), gloo outside
`graph_capture()` and shared memory inside it, so the numbers are what a decode step pays on each path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import statistics
import time
import traceback
from collections.abc import Sequence

DEFAULT_SIZES = (4096, 16384, 65536, 262144, 1048576, 4194304)


def measure_allreduce(
    sizes_bytes: Sequence[int] = DEFAULT_SIZES,
    iters: int = 50,
    warmup: int = 5,
    world_size: int = 2,
    timeout_s: float = 600.0,
) -> list[dict[str, float]]:
    """Start `world_size` CPU ranks and return one row per size: median microseconds per all-reduce on
    gloo and on shared memory (as seen by rank 0), and their ratio."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, tuple(sizes_bytes), iters, warmup, results))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    reports: dict[int, object] = {}
    try:
        while len(reports) < world_size:
            try:
                status, rank, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in reports]
                if dead:
                    raise RuntimeError(f"benchmark rank(s) {dead} died without reporting") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"all-reduce benchmark did not finish within {timeout_s:g}s") from None
                continue
            if status == "error":
                raise RuntimeError(f"benchmark rank {rank} failed:\n{payload}")
            reports[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return reports[0]


def format_table(rows: list[dict[str, float]]) -> str:
    lines = [f"{'size':>8}  {'gloo us':>9}  {'shm us':>9}  {'gloo/shm':>8}"]
    for row in rows:
        size = _human(int(row["size_bytes"]))
        lines.append(f"{size:>8}  {row['gloo_us']:>9.1f}  {row['shm_us']:>9.1f}  {row['speedup']:>7.2f}x")
    return "\n".join(lines)


def _rank_main(
    rank: int, world_size: int, port: int, sizes: tuple[int, ...], iters: int, warmup: int, results: mp.Queue
) -> None:
    try:
        results.put(("ok", rank, _measure_on_rank(rank, world_size, port, sizes, iters, warmup)))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


def _measure_on_rank(
    rank: int, world_size: int, port: int, sizes: tuple[int, ...], iters: int, warmup: int
) -> list[dict[str, float]]:
    import torch

    from graphcap.distributed.coordinator import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    coord = init_distributed(world_size, rank, backend="gloo", timeout_s=120, shm_max_bytes=max(sizes))
    rows = []
    try:
        for size in sizes:
            x = torch.randn(size // 4)
            gloo_us = _median_us(coord, x, iters, warmup)
            shm_before = coord.stats()["shm"]
            with coord.graph_capture():
                shm_us = _median_us(coord, x, iters, warmup)
            if coord.stats()["shm"] - shm_before != iters + warmup:
                raise RuntimeError(f"{size} B all-reduces inside capture did not all take the shared-memory path")
            rows.append({"size_bytes": size, "gloo_us": gloo_us, "shm_us": shm_us, "speedup": gloo_us / shm_us})
    finally:
        destroy_distributed()
    return rows


def _median_us(coord, x, iters: int, warmup: int) -> float:
    """Median of individually timed calls; ranks meet at a barrier first so no rank times its peer's lag."""
    for _ in range(warmup):
        coord.all_reduce(x)
    coord.barrier()
    times = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        coord.all_reduce(x)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000.0


def _human(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):g} MB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):g} KB"
    return f"{n} B"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    print(format_table(measure_allreduce()))
