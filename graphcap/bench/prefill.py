"""Prefill step latency for the protocol's three shapes: one long prompt, a few equal ones, many mixed."""

from __future__ import annotations

import statistics

from graphcap.bench.report import Row, make_row
from graphcap.bench.steps import measure_eager, measure_pair
from graphcap.graph.probe import ProbeBatches

SEED = 4052
# BENCHMARKS.md: (a) 1 x 128, (b) 4 x 32, (c) 8 requests of mixed lengths (fixed here, so runs compare).
CASES: dict[str, list[int]] = {
    "1x128": [128],
    "4x32": [32] * 4,
    "8xmixed": [7, 16, 25, 33, 48, 61, 90, 128],
}


def prefill_rows(eager_llm, graph_llms: dict, iters: int, steps_per_turn: int = 1) -> list[Row]:
    """Per case: an eager row, then one row per prefill graph mode the engine accepted."""
    rows: list[Row] = []
    for case, lens in CASES.items():
        tokens = sum(lens)
        graph_rows, partners = [], []
        for mode, llm in graph_llms.items():
            probes = ProbeBatches(llm.runner, seed=SEED)
            try:
                pair = measure_pair(llm, "prefill", probes.prefill(lens, [0] * len(lens)), iters,
                                    steps_per_turn)
            finally:
                probes.release()
            partners.append(pair.eager_ms)
            graph_rows.append(make_row(
                "prefill", mode, len(lens), pair.graph_ms, pair.speedup, pair.max_abs_diff, pair.tokens_equal,
                case=case, tokens=tokens, eager_ms=pair.eager_ms, replays=pair.replays, fallbacks=pair.fallbacks,
                fallback_reasons=pair.fallback_reasons,
            ))
        if partners:
            eager_ms = statistics.median(partners)
        else:
            probes = ProbeBatches(eager_llm.runner, seed=SEED)
            try:
                eager_ms = measure_eager(eager_llm, probes.prefill(lens, [0] * len(lens)), iters)
            finally:
                probes.release()
        rows.append(make_row("prefill", "eager", len(lens), eager_ms, 1.0, 0.0, True, case=case, tokens=tokens,
                             eager_ms=eager_ms, replays=0, fallbacks=0))
        rows.extend(graph_rows)
    return rows
