"""Graph-versus-eager checks shared by all runners: a mismatch is reported, never silently served."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def compare(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    """Max |out - ref| and whether every element is within atol + rtol * |ref| (NaN never passes)."""
    if out.shape != ref.shape:
        return float("inf"), False
    diff = (out.float() - ref.float()).abs()
    ok = bool(torch.all(diff <= atol + rtol * ref.float().abs()).item())
    return float(diff.max().item()) if diff.numel() else 0.0, ok


def interleaved_timings(
    fa: Callable[[], object], fb: Callable[[], object], iters: int, steps_per_turn: int = 1
) -> tuple[list[float], list[float]]:
    """Milliseconds per call of fa and fb, timed in alternating turns (A B A B) so machine noise hits both alike.

    A turn runs `steps_per_turn` consecutive calls and yields their mean. With one call per turn, every call
    starts on caches the other side just filled, which charges the faster side with refilling them; a
    decode loop never alternates modes like that, so the benchmark times short runs of consecutive steps.
    """
    ta: list[float] = []
    tb: list[float] = []
    fa()
    fb()
    for _ in range(iters):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            for _ in range(steps_per_turn):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / steps_per_turn)
    return ta, tb


def interleaved_medians(
    fa: Callable[[], object], fb: Callable[[], object], iters: int, steps_per_turn: int = 1
) -> tuple[float, float]:
    """Median milliseconds per call of fa and fb from one interleaved run (see `interleaved_timings`)."""
    ta, tb = interleaved_timings(fa, fb, iters, steps_per_turn)
    return statistics.median(ta), statistics.median(tb)


def faster(graph_ms: list[float], eager_ms: list[float]) -> bool:
    """Whether the graph beats eager. Decided on the fastest runs: on a shared machine, noise only ever
    adds time, so minima estimate each side's own cost better than medians of a handful of runs."""
    return min(graph_ms) < min(eager_ms)
