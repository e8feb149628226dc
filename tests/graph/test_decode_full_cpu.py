"""`graph_decode="full"` on CPU (Inductor-compiled step per bucket) equals eager on random batches.

Tolerance: fp32 logits within 1e-4 absolute + 1e-4 relative (the capture-time verification bound), and
identical greedy tokens. Buckets 1, 2 and 4 share one compile (a dynamic batch dimension, compiled at the
largest bucket; batch 1 replays it too), which keeps the compile count at one for the whole module and puts
the shared code under the property test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphcap import LLM, SamplingParams
from graphcap.batch.forward_batch import ForwardMode
from graphcap.graph.backends.cpu_inductor import signature
from graphcap.graph.probe import ProbeBatches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def graph_llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), graph_decode="full", decode_sizes=[1, 2, 4], graph_select="always",
             kv_cache_tokens=4096, max_running_requests=8, graph_prefill="eager") as llm:
        yield llm


@pytest.fixture(scope="module")
def eager_llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), kv_cache_tokens=4096, max_running_requests=8, graph_decode="eager", graph_prefill="eager") as llm:
        yield llm


def test_capture_report(graph_llm) -> None:
    decode = graph_llm.stats()["decode"]
    assert decode["mode"] == "full"
    assert decode["captured"] == [1, 2, 4]
    assert all(decode["buckets"][b]["max_abs_diff"] < 1e-4 for b in (1, 2, 4))
    assert graph_llm.runner.graph_runners[ForwardMode.DECODE].backend.compiles() == 1
    assert decode["capture_seconds"] > 0
    startup = graph_llm.stats()["startup"]  # where start-up went, by kind (also the one line on stderr)
    assert startup["compile"] > 0 and startup["verify"] > 0 and startup["load"] > 0
    assert startup["compile"] + startup["verify"] + startup["timing"] <= startup["seconds"]


def test_only_the_dynamic_dimensions_may_differ_between_shared_compiles() -> None:
    def fn(x, y):
        return x

    a, b = torch.zeros(4, 8), torch.zeros(4)
    key = signature(fn, (a, b), [(0, 0), (1, 0)])
    assert signature(fn, (torch.zeros(16, 8), torch.zeros(16)), [(0, 0), (1, 0)]) == key
    assert signature(fn, (torch.zeros(16, 9), torch.zeros(16)), [(0, 0), (1, 0)]) != key  # a static size
    assert signature(fn, (torch.zeros(4, 8), torch.zeros(4)), [(0, 0)]) != key  # what is marked
    assert signature(fn, (torch.zeros(8, 4).t(), b), [(0, 0), (1, 0)]) != key  # strides
    assert signature(fn, (a.double(), b), [(0, 0), (1, 0)]) != key  # dtype
    assert signature(lambda x, y: x, (a, b), [(0, 0), (1, 0)]) != key  # another function


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 6), max_context=st.integers(2, 120), seed=st.integers(0, 2**16))
def test_random_decode_batches_match_eager(graph_llm, batch_size, max_context, seed) -> None:
    runner = graph_llm.runner
    probes = ProbeBatches(runner, seed=seed)
    try:
        batch = probes.decode(batch_size, max_context=max_context)
        before = graph_llm.stats()["decode"]
        out = runner.forward(batch)
        after = graph_llm.stats()["decode"]
        ref = runner.forward_eager(batch)
    finally:
        probes.release()
    if batch_size > 4:  # 1 and 2 replay the bucket-2 graph, 3 and 4 the bucket-4 one: the same compile
        assert after["rejects"].get("batch_too_large", 0) == before["rejects"].get("batch_too_large", 0) + 1
        assert after["replays"] == before["replays"]
    else:
        assert after["replays"] == before["replays"] + 1
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_generation_with_requests_finishing_mid_batch_matches_eager(graph_llm, eager_llm, kit) -> None:
    prompts = kit.prompts(6, seed=3)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 17, 8, 24, 12, 5)]
    got = graph_llm.generate(prompt_token_ids=prompts, sampling_params=params)
    want = eager_llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    decode = graph_llm.stats()["decode"]
    assert decode["replays"] > 0
    assert decode["rejects"].get("batch_too_large", 0) > 0  # 6 running > bucket 4, until some finish
