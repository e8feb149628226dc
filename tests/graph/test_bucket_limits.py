"""Engines whose limits are below the default buckets (model length, prefill budget, KV cache) start and
serve in every graph mode with the default buckets: sizes that can never be given a batch are not
captured (said in stats), and no capture probe exceeds the model's positions (a compiled segment that
indexes the rotary table past its end aborts the whole process)."""

from __future__ import annotations

import shutil

import pytest

from graphcap import LLM, SamplingParams

pytestmark = pytest.mark.slow

CASES = [
    # (max_position_embeddings, decode mode, prefill mode, engine limits)
    (64, "full", "breakable", {}),
    (500, "piecewise", "piecewise", {"kv_cache_tokens": 384}),
    (512, "full", "breakable", {"max_prefill_tokens": 200}),
]


@pytest.mark.parametrize("positions,decode,prefill,limits", CASES, ids=[str(c[0]) for c in CASES])
def test_small_limits_start_and_serve(tmp_path, llama_ckpt, kit, positions, decode, prefill, limits):
    path = tmp_path / f"pos{positions}"
    shutil.copytree(llama_ckpt.path, path)
    kit.edit_config(path, max_position_embeddings=positions)
    prompts = [list(range(3, 3 + min(positions - 10, 180))), [5, 6, 7]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with LLM(str(path), graph_decode="eager", graph_prefill="eager", **limits) as eager:
        want = [o.token_ids for o in eager.generate(prompt_token_ids=prompts, sampling_params=params)]
    with LLM(str(path), graph_decode=decode, graph_prefill=prefill, graph_select="always", **limits) as llm:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        stats = llm.stats()
    assert got == want
    prefill_stats = stats["prefill"]
    if limits:  # a budget or cache below the largest default bucket (2048): the sizes above it are not captured
        clamped = prefill_stats["clamped"]
        assert clamped is not None and max(clamped["dropped"]) == 2048
        assert all(b <= clamped["limit"] for b in prefill_stats["buckets"])
    else:  # only the model is short: a batch of many requests still fills every bucket, so all are captured
        assert prefill_stats["clamped"] is None and max(prefill_stats["buckets"]) == 2048
    assert prefill_stats["replays"] > 0 and stats["decode"]["replays"] > 0
    assert all(b["status"] == "graph" for b in prefill_stats["buckets"].values()), prefill_stats["buckets"]
