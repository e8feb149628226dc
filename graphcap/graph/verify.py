"""Graph-versus-eager checks shared by all runners: a mismatch is reported, never silently served."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def compare(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    """Max |out - ref| and whether every element is within atol + rtol * |ref| (NaN never passes)."""
    if out.shape != ref.shape:
        return float("inf"), False
    diff = (out.float() - ref.float()).abs()
    ok = bool(torch.all(diff <= atol + rtol * ref.float().abs()).item())
    return float(diff.max().item()) if diff.numel() else 0.0, ok


# A graph may be this many times further from the float64 reference than eager is. Reassociating a sum of n
# terms changes its rounding error by an amount of the same order as that error, so a benign graph lands
# within a small multiple of eager's own error (on SmolLM2 fp32 and bf16, and on tiny; docs/benchmarks.md
# lists the ratios measured); every real fault seen (a wrong position, a stale or misplaced KV write,
# padding leaking into live rows, a wrong bucket) lands orders of magnitude beyond it.
ERROR_FACTOR = 8.0
# Below this many units in the last place of the largest reference logit, differences are rounding noise
# even when eager happens to round almost exactly (a tiny model can sit within 1e-7 of float64).
FLOOR_ULPS = 64


@dataclass(frozen=True)
class Accuracy:
    """How far graph and eager each are from the float64 reference (max absolute error over the batch)."""

    graph_error: float
    eager_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.graph_error <= self.bound  # NaN compares false: never passes

    @property
    def ratio(self) -> float:
        """The graph's error in units of eager's own: what `stats()` reports per bucket."""
        if self.eager_error > 0:
            return self.graph_error / self.eager_error
        return 0.0 if self.graph_error == 0 else float("inf")


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |out - ref| in float64; inf for mismatched shapes, NaN where either holds one."""
    if out.shape != ref.shape:
        return float("inf")
    return float((out.double() - ref.double()).abs().max().item()) if out.numel() else 0.0


def _floor(eager: torch.Tensor, ref: torch.Tensor) -> float:
    return FLOOR_ULPS * torch.finfo(eager.dtype).eps * (float(ref.double().abs().max().item()) if ref.numel() else 0.0)


def accuracy(graph: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor) -> Accuracy:
    """Judge a graph's output against a float64 reference, with eager's own distance as the yardstick."""
    eager_error = max_abs_error(eager, reference)
    return Accuracy(max_abs_error(graph, reference), eager_error,
                    ERROR_FACTOR * eager_error + _floor(eager, reference))


def accuracy_within(graph: torch.Tensor, eager: torch.Tensor, eager_error: float) -> Accuracy:
    """Judge a graph against eager where no reference was computed, from eager's error measured on another
    batch of the same model: a graph within ERROR_FACTOR of float64 is within ERROR_FACTOR + 1 of eager."""
    return Accuracy(max_abs_error(graph, eager), eager_error,
                    (ERROR_FACTOR + 1) * eager_error + _floor(eager, eager))


def interleaved_timings(
    fa: Callable[[], object], fb: Callable[[], object], iters: int, steps_per_turn: int = 1, warmup: bool = True
) -> tuple[list[float], list[float]]:
    """Milliseconds per call of fa and fb, timed in alternating turns (A B A B) so machine noise hits both alike.

    A turn runs `steps_per_turn` consecutive calls and yields their mean. With one call per turn, every call
    starts on caches the other side just filled, which charges the faster side with refilling them; a
    decode loop never alternates modes like that, so the benchmark times short runs of consecutive steps.
    """
    ta: list[float] = []
    tb: list[float] = []
    if warmup:
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
