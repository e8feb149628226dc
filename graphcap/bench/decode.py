"""Decode step latency per batch size: eager against each graph mode, on identical random batches."""

from __future__ import annotations

import statistics

from graphcap.bench.report import Row, make_row
from graphcap.bench.steps import measure_eager, measure_pair
from graphcap.graph.probe import ProbeBatches

SEED = 2026


def decode_rows(eager_llm, graph_llms: dict, batch_sizes: list[int], iters: int, max_context: int,
                steps_per_turn: int = 1) -> list[Row]:
    """Per batch size: an eager baseline row, then one row per graph mode.

    Every mode gets the batch drawn from the same seed (same context lengths, tokens and KV contents;
    the presets' weights are identical in every engine), so rows of one batch size are comparable. The
    eager row's time is the median of the eager partners timed beside the graph modes, or eager alone.
    """
    rows: list[Row] = []
    for bs in batch_sizes:
        graph_rows, partners = [], []
        for mode, llm in graph_llms.items():
            probes = ProbeBatches(llm.runner, seed=SEED + bs)
            try:
                pair = measure_pair(llm, "decode", probes.decode(bs, max_context=max_context), iters,
                                    steps_per_turn)
            finally:
                probes.release()
            partners.append(pair.eager_ms)
            graph_rows.append(make_row(
                "decode", mode, bs, pair.graph_ms, pair.speedup, pair.max_abs_diff, pair.tokens_equal,
                eager_ms=pair.eager_ms, replays=pair.replays, fallbacks=pair.fallbacks,
                fallback_reasons=pair.fallback_reasons,
            ))
        if partners:
            eager_ms = statistics.median(partners)
        else:
            probes = ProbeBatches(eager_llm.runner, seed=SEED + bs)
            try:
                eager_ms = measure_eager(eager_llm, probes.decode(bs, max_context=max_context), iters)
            finally:
                probes.release()
        rows.append(make_row("decode", "eager", bs, eager_ms, 1.0, 0.0, True, eager_ms=eager_ms, replays=0,
                             fallbacks=0))
        rows.extend(graph_rows)
    return rows
