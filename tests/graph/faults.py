"""Faults injected into a captured graph's replay, for tests that verification must catch them.

Decode and prefill replays take positions as argument 1 and the KV write slots as argument 2; each fault
corrupts one thing a real capture bug corrupts, and leaves the captured graph itself untouched.
"""

from __future__ import annotations

from typing import Callable

import torch

from graphcap.graph.stats import BucketReport


def _with_arg(index: int, change: Callable[[torch.Tensor], torch.Tensor]):
    def fault(replay):
        def faulty(current, *rest):
            args = list(current)
            args[index] = change(args[index])
            return replay(tuple(args), *rest)

        return faulty

    return fault


def _rolled(replay):
    """Live rows take their neighbours' results: a padding row's output lands in a live row."""
    return lambda current, *rest: torch.roll(replay(current, *rest), 1, 0)


def _half_bucket(replay):
    """The batch runs on a graph of half the bucket's rows (the wrong bucket)."""

    def faulty(current, *rest):
        rows = current[0].shape[0] // 2
        return replay(tuple(a[:rows] if a.dim() and a.shape[0] == current[0].shape[0] else a for a in current),
                      *rest)

    return faulty


FAULTS: dict[str, Callable] = {
    "wrong_position": _with_arg(1, lambda p: p + 1),
    "stale_kv": _with_arg(2, torch.zeros_like),  # the new keys/values go to the padding page, not their slot
    "misplaced_kv_write": _with_arg(2, lambda s: s + 1),
    "padding_leak": _rolled,
    "wrong_bucket": _half_bucket,
}


def verify_with(runner, bucket: int, fault: Callable | None) -> tuple[bool, BucketReport]:
    """Re-run a captured bucket's verification with `fault` wrapped around its replay. The float64 copy of the
    model stays cached on the runner for the next call; the caller frees it (`release_float64_copy`)."""
    from graphcap.graph.probe import ProbeBatches

    original = runner.replays[bucket]
    if fault is not None:
        runner.replays[bucket] = fault(original)
    runner.reference = runner._make_reference()
    probes = ProbeBatches(runner.mr, seed=99)
    report = BucketReport(bucket)
    try:
        with torch.inference_mode():
            try:
                ok = runner._verify(bucket, report, probes)
            except (RuntimeError, IndexError):  # a fault that breaks the replay outright
                ok = False
    finally:
        probes.release()
        runner.replays[bucket] = original
        runner.reference.close()
        runner.reference = None
    return ok, report
