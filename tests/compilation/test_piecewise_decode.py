"""Piecewise decode through the engine: compiled pieces per bucket with eager attention between them must
generate what eager generates, for any batch the scheduler forms."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphcap import LLM, SamplingParams

pytestmark = pytest.mark.slow

COMMON = dict(max_running_requests=4, kv_cache_tokens=1024, max_model_len=128, graph_prefill="eager")


@pytest.fixture(scope="module")
def engines(llama_ckpt, tmp_path_factory):
    cache = tmp_path_factory.mktemp("compile_cache")
    piecewise = LLM(str(llama_ckpt.path), graph_decode="piecewise", decode_sizes=[4], graph_select="always",
                    graph_verify="strict", cache_dir=str(cache), **COMMON)
    eager = LLM(str(llama_ckpt.path), graph_decode="eager", **COMMON)
    yield piecewise, eager
    piecewise.shutdown()
    eager.shutdown()


def test_compile_report(engines) -> None:
    stats = engines[0].stats()
    compile_ = stats["compile"]
    assert compile_["pieces"] == 5  # 2 attention layers
    assert compile_["unique_compiles"] == 3
    assert compile_["cache"] in ("hit", "miss") and compile_["compile_seconds"] > 0
    assert set(compile_["passes"]) >= {"noop_elimination", "fix_functionalization"}
    assert stats["decode"]["buckets"][4]["status"] == "graph"


prompt = st.lists(st.integers(3, 255), min_size=1, max_size=12)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(prompt, min_size=1, max_size=4), new_tokens=st.integers(2, 6))
def test_piecewise_decode_equals_eager(engines, prompts, new_tokens) -> None:
    piecewise, eager = engines
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    replays = piecewise.stats()["decode"]["replays"]
    got = [o.token_ids for o in piecewise.generate(prompt_token_ids=prompts, sampling_params=params)]
    want = [o.token_ids for o in eager.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert got == want
    assert piecewise.stats()["decode"]["replays"] > replays
