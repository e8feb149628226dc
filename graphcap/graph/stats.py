"""Counters every graph runner keeps, so each fallback to eager is visible with its reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class BucketReport:
    size: int
    status: str = "pending"  # graph | eager (slower) | rejected
    reason: str | None = None
    graph_ms: float | None = None
    eager_ms: float | None = None
    max_abs_diff: float | None = None  # graph vs eager, worst over the verification batches
    graph_error: float | None = None  # max |graph - float64 reference|, worst batch
    eager_error: float | None = None  # max |eager - float64 reference| on that batch
    error_ratio: float | None = None  # graph_error / eager_error: how much less accurate the graph is
    min_size: int = 0  # live sizes below this run eagerly: padded that far, the graph loses to eager

    def record_accuracy(self, graph_error: float, eager_error: float, ratio: float) -> None:
        if self.error_ratio is None or ratio > self.error_ratio:
            self.graph_error, self.eager_error, self.error_ratio = graph_error, eager_error, ratio

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "size"}


@dataclass
class RunnerStats:
    mode: str
    replays: int = 0
    rejects: Counter = field(default_factory=Counter)
    buckets: dict[int, BucketReport] = field(default_factory=dict)
    capture_seconds: float = 0.0  # all of it: the parts below and probe set-up
    compile_seconds: float = 0.0  # compiling and capturing the buckets' graphs
    verify_seconds: float = 0.0
    timing_seconds: float = 0.0
    restore_seconds: float = 0.0  # loading cached graphs and checking them (graph/cache.py)
    graph_memory_bytes: int = 0
    cache_hits: int = 0  # buckets restored from the graph cache
    cache_misses: Counter = field(default_factory=Counter)  # buckets captured instead, by reason

    clamped: dict | None = None

    def clamp(self, configured, buckets, limit: int, by: str) -> None:
        """Say which configured sizes the engine's limits left out (they could never be given a batch)."""
        dropped = sorted(s for s in configured if s not in buckets)
        if dropped:
            self.clamped = {"dropped": dropped, "limit": limit, "by": by}

    def reject(self, reason: str) -> None:
        self.rejects[reason] += 1

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "replays": self.replays,
            "rejects": dict(self.rejects),
            "captured": sorted(s for s, b in self.buckets.items() if b.status == "graph"),
            "buckets": {s: b.as_dict() for s, b in sorted(self.buckets.items())},
            "clamped": self.clamped,
            "capture_seconds": round(self.capture_seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
            "verify_seconds": round(self.verify_seconds, 3),
            "timing_seconds": round(self.timing_seconds, 3),
            "restore_seconds": round(self.restore_seconds, 3),
            "graph_memory_bytes": self.graph_memory_bytes,
            "cache": {"hits": self.cache_hits, "misses": dict(self.cache_misses)},
        }
