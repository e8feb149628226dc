"""Prefill graphs on CPU, keyed by token count, with attention eager between graph pieces:
`breakable` (regionally compiled segments) and `piecewise` (the compilation layer's split graph).
Tolerance as for decode: 1e-4 abs + 1e-4 rel on fp32 logits, and identical greedy tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphcap import LLM, SamplingParams
from graphcap.batch.forward_batch import ForwardMode
from graphcap.graph.probe import ProbeBatches

pytestmark = pytest.mark.slow

BUCKETS = [32, 64, 128]


@pytest.fixture(scope="module", params=["breakable", "piecewise"])
def graph_llm(request, llama_ckpt):
    with LLM(str(llama_ckpt.path), graph_prefill=request.param, prefill_sizes=BUCKETS, max_prefill_tokens=128,
             graph_select="always", kv_cache_tokens=4096, use_cache=False, graph_decode="eager") as llm:
        yield llm


@pytest.fixture(scope="module")
def eager_llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), max_prefill_tokens=128, kv_cache_tokens=4096, graph_decode="eager", graph_prefill="eager") as llm:
        yield llm


def test_capture_report(graph_llm) -> None:
    prefill = graph_llm.stats()["prefill"]
    assert prefill["mode"] in ("breakable", "piecewise")
    assert prefill["captured"] == BUCKETS


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 30)), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_random_multi_request_prefill_matches_eager(graph_llm, lens, seed) -> None:
    extend = [e for e, _ in lens]
    prefix = [p for _, p in lens]
    runner = graph_llm.runner
    probes = ProbeBatches(runner, seed=seed)
    try:
        batch = probes.prefill(extend, prefix)
        reason = runner.graph_runners[ForwardMode.PREFILL].can_run(batch)
        before = graph_llm.stats()["prefill"]["replays"]
        out = runner.forward(batch)
        replayed = graph_llm.stats()["prefill"]["replays"] - before
        ref = runner.forward_eager(batch)
    finally:
        probes.release()
    assert replayed == (1 if reason is None else 0)
    tokens = sum(extend)
    if tokens > 128:
        assert reason == "too_many_tokens"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_break_outputs_stay_correct_across_buckets(graph_llm) -> None:
    """Replay a large bucket after smaller ones ran (and vice versa): nothing a bucket reads may have been
    reused by another bucket's capture."""
    runner = graph_llm.runner
    probes = ProbeBatches(runner, seed=5)
    try:
        for extend in ([100, 20], [16, 10], [60, 60], [20, 12]):
            batch = probes.prefill(extend, [0, 0])
            torch.testing.assert_close(runner.forward(batch), runner.forward_eager(batch), atol=1e-4, rtol=1e-4)
    finally:
        probes.release()


def test_many_request_prefill_runs_on_graph_with_zero_fallbacks(graph_llm, eager_llm, kit) -> None:
    """4 x 32 and 8 mixed-length requests each prefill in one graph replay, and greedy tokens match eager."""
    for prompts in ([p[:1] * 32 for p in kit.prompts(4, seed=1)], kit.prompts(8, seed=2, lo=4, hi=15)):
        before = graph_llm.stats()["prefill"]
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        got = graph_llm.generate(prompt_token_ids=prompts, sampling_params=params)
        after = graph_llm.stats()["prefill"]
        assert after["replays"] == before["replays"] + 1
        assert sum(after["rejects"].values()) == sum(before["rejects"].values())
        want = eager_llm.generate(prompt_token_ids=prompts, sampling_params=params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_chunked_prefill_on_graph_matches_eager(graph_llm, eager_llm, kit) -> None:
    prompts = kit.prompts(3, seed=4, lo=150, hi=240)  # longer than the 128-token budget: chunked
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    got = graph_llm.generate(prompt_token_ids=prompts, sampling_params=params)
    want = eager_llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
