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


def interleaved_timings(fa: Callable[[], object], fb: Callable[[], object], iters: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each call of fa and fb, timed alternately (A B A B) so machine noise hits both alike."""
    ta: list[float] = []
    tb: list[float] = []
    fa()
    fb()
    for _ in range(iters):
        t = time.perf_counter()
        fa()
        ta.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        fb()
        tb.append((time.perf_counter() - t) * 1e3)
    return ta, tb


def interleaved_medians(fa: Callable[[], object], fb: Callable[[], object], iters: int) -> tuple[float, float]:
    """Median milliseconds of fa and fb from one interleaved run."""
    ta, tb = interleaved_timings(fa, fb, iters)
    return statistics.median(ta), statistics.median(tb)


def faster(graph_ms: list[float], eager_ms: list[float]) -> bool:
    """Whether the graph beats eager. Decided on the fastest runs: on a shared machine, noise only ever
    adds time, so minima estimate each side's own cost better than medians of a handful of runs."""
    return min(graph_ms) < min(eager_ms)
