"""One model step, graph path against eager path, on the same engine and the same batch.

Both sides run on the *graph* LLM: the graph side through `ModelRunner.forward` (the dispatch `generate`
uses: can_run, padding to the bucket, static-buffer copies, replay, slicing), the eager side through
`ModelRunner.forward_eager` (exactly what `forward` falls back to). That is the most honest pairing we
have: the weights, the KV pages and their cache locality are identical by construction, so the diff
column measures only the mode and the ratio charges the graph side with every cost it adds. The eager
side skips `forward`'s dictionary lookup and counter, which is tens of nanoseconds, in eager's favour.

The replay counter is read around the whole measurement: a step that fell back to eager is counted and
its reason kept, so a silent fallback can never pass as a graph number.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from graphcap.batch.forward_batch import ForwardBatch
from graphcap.graph.verify import compare, interleaved_medians

ATOL = RTOL = 1e-4


@dataclass
class StepPair:
    graph_ms: float
    eager_ms: float
    max_abs_diff: float
    tokens_equal: bool
    replays: int
    fallbacks: int
    fallback_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.graph_ms


def _counters(llm, phase: str) -> tuple[int, int, Counter]:
    """(graph replays, eager steps taken through forward, rejects by reason) for a phase's runner."""
    stats = llm.stats()
    runner = stats.get(phase) or {}
    return runner.get("replays", 0), stats["eager_steps"].get(phase, 0), Counter(runner.get("rejects", {}))


@torch.inference_mode()
def measure_pair(llm, phase: str, batch: ForwardBatch, iters: int, steps_per_turn: int = 1) -> StepPair:
    """Check graph logits against eager once, then time both in alternating turns of `steps_per_turn` steps."""
    mr = llm.runner
    replays0, eager0, rejects0 = _counters(llm, phase)
    out, ref = mr.forward(batch), mr.forward_eager(batch)
    diff, _ = compare(out, ref, ATOL, RTOL)
    equal = bool(torch.equal(out.argmax(-1), ref.argmax(-1)))
    graph_ms, eager_ms = interleaved_medians(lambda: mr.forward(batch), lambda: mr.forward_eager(batch), iters,
                                             steps_per_turn)
    replays1, eager1, rejects1 = _counters(llm, phase)
    return StepPair(graph_ms, eager_ms, diff, equal, replays1 - replays0, eager1 - eager0,
                    dict(rejects1 - rejects0))


@torch.inference_mode()
def measure_eager(llm, batch: ForwardBatch, iters: int) -> float:
    """Median ms of the eager step alone (when no graph mode is asked for there is nothing to interleave)."""
    mr = llm.runner
    mr.forward_eager(batch)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        mr.forward_eager(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
