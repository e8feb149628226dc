"""Prefill runner mechanics on the eager backend (no compiling): the break-even size below which a bucket's
graph is not used, because the graph pays for the whole bucket and eager only for the real tokens."""

from __future__ import annotations

import pytest

from graphcap import LLM
from graphcap.graph.config import PrefillGraphConfig
from graphcap.graph.probe import ProbeBatches
from graphcap.graph.runners import base as runner_base
from graphcap.graph.runners.prefill import PrefillGraphRunner


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), kv_cache_tokens=2048, graph_decode="eager", graph_prefill="eager") as engine:
        yield engine


def _timed(monkeypatch, full: tuple[float, float], low: tuple[float, float]) -> None:
    """Fixed (graph, eager) milliseconds: `full` on the bucket's two full timing shapes (the selection),
    `low` on its most padded batch (the break-even point), in the order the runner times them."""
    calls: list[int] = []

    def time_pair(self, graph, eager):
        calls.append(1)
        times = full if len(calls) % 3 else low
        return [times[0]] * 3, [times[1]] * 3

    monkeypatch.setattr(runner_base.BucketedGraphRunner, "time_pair", time_pair)


def test_batches_below_the_break_even_size_run_eagerly(llm, monkeypatch) -> None:
    # Full (64 tokens): graph 3 ms, eager 4 ms. Most padded (32 tokens): graph 3 ms, eager 2 ms. The lines
    # cross halfway: from 48 tokens on, the graph pays off.
    _timed(monkeypatch, full=(3.0, 4.0), low=(3.0, 2.0))
    runner = PrefillGraphRunner(llm.runner, PrefillGraphConfig(mode="eager", sizes=(64,), select="auto"), 64, llm.max_model_len)
    runner.capture()
    assert runner.stats()["buckets"][64]["min_size"] == 48
    probes = ProbeBatches(llm.runner, seed=3)
    try:
        assert runner.can_run(probes.prefill([20, 20], [0, 0])) == "padding_slower_than_eager"
        assert runner.can_run(probes.prefill([30, 20], [0, 0])) is None
        assert runner.can_run(probes.prefill([30], [0])) == "too_much_padding"  # 64 > 2 x 30 comes first
    finally:
        probes.release()


def test_a_graph_that_wins_even_when_padded_serves_the_whole_bucket(llm, monkeypatch) -> None:
    _timed(monkeypatch, full=(3.0, 4.0), low=(2.5, 2.6))
    runner = PrefillGraphRunner(llm.runner, PrefillGraphConfig(mode="eager", sizes=(32, 64), select="auto"), 64, llm.max_model_len)
    runner.capture()
    assert all(b["min_size"] == 0 for b in runner.stats()["buckets"].values())
    probes = ProbeBatches(llm.runner, seed=5)
    try:
        assert runner.can_run(probes.prefill([33], [0])) is None  # the fewest tokens the 64 bucket takes
    finally:
        probes.release()


def test_graph_select_always_serves_every_size(llm) -> None:
    runner = PrefillGraphRunner(llm.runner, PrefillGraphConfig(mode="eager", sizes=(64,), select="always"), 64,
                                llm.max_model_len)
    runner.capture()
    assert all(b["min_size"] == 0 for b in runner.stats()["buckets"].values())
    probes = ProbeBatches(llm.runner, seed=4)
    try:
        assert runner.can_run(probes.prefill([20, 20], [0, 0])) is None
    finally:
        probes.release()
