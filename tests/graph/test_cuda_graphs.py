"""CUDA graph paths (`-m cuda`): decode `full` (CUDAGraph per bucket, shared pool) and prefill `breakable`
(per-segment graphs with eager attention), each verified against eager on random batches."""

from __future__ import annotations

import pytest
import torch

from graphcap import LLM, SamplingParams
from graphcap.graph.probe import ProbeBatches

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), device="cuda", graph_decode="full", decode_sizes=[1, 2, 4, 8],
             graph_prefill="breakable", prefill_sizes=[32, 64, 128], max_prefill_tokens=128,
             graph_select="always", kv_cache_tokens=4096) as llm:
        yield llm


@pytest.fixture(scope="module")
def cuda_eager(llama_ckpt):
    with LLM(str(llama_ckpt.path), device="cuda", max_prefill_tokens=128, kv_cache_tokens=4096, graph_decode="eager", graph_prefill="eager") as llm:
        yield llm


def test_all_buckets_captured(cuda_llm) -> None:
    stats = cuda_llm.stats()
    assert stats["decode"]["captured"] == [1, 2, 4, 8]
    assert stats["prefill"]["captured"] == [32, 64, 128]
    assert stats["decode"]["graph_memory_bytes"] > 0


def _assert_decode_replay_matches_eager(llm: LLM, batch_size: int, seed: int, max_context: int) -> None:
    probes = ProbeBatches(llm.runner, seed=seed)
    try:
        batch = probes.decode(batch_size, max_context=max_context)
        out = llm.runner.forward(batch).clone()
        ref = llm.runner.forward_eager(batch)
    finally:
        probes.release()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_decode_replay_matches_eager(cuda_llm, batch_size) -> None:
    _assert_decode_replay_matches_eager(cuda_llm, batch_size, seed=batch_size, max_context=90)


def test_breakable_prefill_across_buckets_matches_eager(cuda_llm) -> None:
    """Interleave buckets: a bucket's break inputs must survive other buckets' captures and replays."""
    probes = ProbeBatches(cuda_llm.runner, seed=3)
    try:
        for extend in ([100, 20], [16, 10], [60, 60], [20, 12]):
            batch = probes.prefill(extend, [0, 7])
            out = cuda_llm.runner.forward(batch).clone()
            torch.testing.assert_close(out, cuda_llm.runner.forward_eager(batch), atol=1e-4, rtol=1e-4)
    finally:
        probes.release()


def test_generation_matches_eager(cuda_llm, cuda_eager, kit) -> None:
    prompts = kit.prompts(6, seed=11)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    got = cuda_llm.generate(prompt_token_ids=prompts, sampling_params=params)
    want = cuda_eager.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert cuda_llm.stats()["decode"]["replays"] > 0


def test_piecewise_decode_cuda_graph_per_piece_matches_eager(llama_ckpt) -> None:
    """`piecewise` on CUDA: each compiled piece is a CUDA graph per size, attention eager between them."""
    with LLM(str(llama_ckpt.path), device="cuda", graph_decode="piecewise", decode_sizes=[1, 4],
             graph_select="always", kv_cache_tokens=4096, use_cache=False, graph_prefill="eager") as llm:
        assert llm.stats()["decode"]["captured"] == [1, 4]
        for batch_size in (1, 3, 4):
            _assert_decode_replay_matches_eager(llm, batch_size, seed=40 + batch_size, max_context=70)
        assert llm.stats()["decode"]["replays"] == 3
