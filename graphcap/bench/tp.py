"""Decode step rows under tensor parallelism, measured from the API process.

A TP engine's model lives in its ranks, so rows go through `execute` with plain lists, exactly as
`generate` drives it: the graph engine and an eager TP engine each get the same decode batch (same
tokens, lengths and page layout in their own, identically initialised KV caches) and are timed
interleaved. Replays and fallbacks come from rank 0's counters around the measurement.
"""

from __future__ import annotations

import statistics

import torch

from graphcap.bench.report import Row, make_row
from graphcap.batch.forward_batch import ForwardMode
from graphcap.graph.verify import compare, interleaved_medians

SEED = 2026


def _decode_inputs(llm, batch_size: int, max_context: int, seed: int) -> tuple[list, list, list]:
    gen = torch.Generator().manual_seed(seed)
    pool = llm.runner.pool
    prefix = torch.randint(1, max_context, (batch_size,), generator=gen).tolist()
    tokens = torch.randint(0, llm.model_config.vocab_size, (batch_size,), generator=gen).tolist()
    pages = [pool.alloc(pool.pages_for(p + 1)) for p in prefix]
    if any(p is None for p in pages):
        raise RuntimeError("KV cache too small for the TP decode benchmark")
    return [[t] for t in tokens], prefix, pages


def tp_decode_rows(eager_llm, graph_llms: dict, batch_sizes: list[int], iters: int, max_context: int,
                   steps_per_turn: int = 1) -> list[Row]:
    rows: list[Row] = []
    for bs in batch_sizes:
        partners, graph_rows = [], []
        for mode, llm in graph_llms.items():
            graph_in = _decode_inputs(llm, bs, max_context, SEED + bs)
            eager_in = _decode_inputs(eager_llm, bs, max_context, SEED + bs)
            before = llm.stats()["decode"]
            graph_ms, eager_ms = interleaved_medians(
                lambda: llm.runner.execute(ForwardMode.DECODE, *graph_in),
                lambda: eager_llm.runner.execute(ForwardMode.DECODE, *eager_in), iters, steps_per_turn,
            )
            after = llm.stats()["decode"]
            out = llm.runner.execute(ForwardMode.DECODE, *graph_in)
            ref = eager_llm.runner.execute(ForwardMode.DECODE, *eager_in)
            diff, _ = compare(out, ref, 1e-4, 1e-4)
            for engine, (_, _, pages) in ((llm, graph_in), (eager_llm, eager_in)):
                for p in pages:
                    engine.runner.pool.free(p)
            rejects = {k: v - before["rejects"].get(k, 0) for k, v in after["rejects"].items()
                       if v - before["rejects"].get(k, 0)}
            partners.append(eager_ms)
            graph_rows.append(make_row(
                "decode", mode, bs, graph_ms, eager_ms / graph_ms, diff, bool(torch.equal(out.argmax(-1), ref.argmax(-1))),
                eager_ms=eager_ms, replays=after["replays"] - before["replays"], fallbacks=sum(rejects.values()),
                fallback_reasons=rejects,
            ))
        eager_ms = statistics.median(partners) if partners else float("nan")
        rows.append(make_row("decode", "eager", bs, eager_ms, 1.0, 0.0, True, eager_ms=eager_ms, replays=0,
                             fallbacks=0))
        rows.extend(graph_rows)
    return rows
