"""Tensor parallelism through the public API: tp_size=2 on CPU equals tp_size=1, collectives inside
captured graphs take the communicator's capture path, and a dead rank ends the run with an error."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from graphcap import LLM, SamplingParams
from graphcap.cli import main
from graphcap.distributed.launcher import RankFailure
from graphcap.batch.forward_batch import ForwardMode

pytestmark = pytest.mark.slow

PROMPTS = [[1, 2, 3, 4, 5], [7] * 19, [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


def _prefill_logits(llm: LLM) -> torch.Tensor:
    pages = [[1, 2], [3, 4], [5, 6]]
    return llm.runner.execute(ForwardMode.PREFILL, PROMPTS, [0, 0, 0], pages)


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_tp2_eager_equals_tp1(model) -> None:
    with LLM(model, kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as single:
        want_logits = _prefill_logits(single)
        want = [o.token_ids for o in single.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    with LLM(model, tp_size=2, kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as tp:
        got_logits = _prefill_logits(tp)
        got = [o.token_ids for o in tp.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
        stats = tp.stats()
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert got == want
    assert stats["tp"]["world_size"] == 2


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_tp2_graphs_equal_tp1_and_collectives_in_graphs_take_the_capture_path(model) -> None:
    with LLM(model, kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as single:
        want_logits = _prefill_logits(single)
        want = [o.token_ids for o in single.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    with LLM(model, tp_size=2, kv_cache_tokens=1024, graph_decode="full", decode_sizes=[4],
             graph_prefill="breakable", prefill_sizes=[64], max_prefill_tokens=64, graph_select="always") as tp:
        got_logits = _prefill_logits(tp)  # 35 tokens: replays the 64-token breakable bucket
        got = [o.token_ids for o in tp.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
        stats = tp.stats()
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert got == want
    assert stats["decode"]["replays"] > 0 and stats["prefill"]["replays"] > 0
    for rank_counters in stats["tp"]["communicators"]:
        assert rank_counters["shm"] > 0  # all-reduces replayed inside the compiled decode step


def test_killing_a_rank_ends_the_run_with_an_error() -> None:
    llm = LLM("tiny", tp_size=2, kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager")
    try:
        os.kill(llm.runner.group.procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
        assert time.monotonic() - start < 60
        assert not any(p.is_alive() for p in llm.runner.group.procs)
    finally:
        llm.shutdown()


def test_cli_generate_tp2_matches_tp1(capsys) -> None:
    outputs = []
    for tp in ("1", "2"):
        assert main(["generate", "--model", "tiny", "--graph-decode", "eager", "--graph-prefill", "eager",
                     "--prompt-ids", "5,6,7", "--max-new-tokens", "6",
                     "--ignore-eos", "--tp", tp, "--kv-cache-tokens", "512", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_tp2_piecewise_with_allreduce_rmsnorm_fusion_equals_tp1(model) -> None:
    """Piecewise decode and prefill under TP. With all-reduce kept inside pieces (only attention splits)
    and custom RMSNorm ops, the all-reduce+RMSNorm fusion has patterns to fire on."""
    compilation = {"splitting_ops": ["graphcap::attention"], "custom_ops": ["rms_norm"],
                   "pass_config": {"enable_allreduce_rms_fusion": True}}
    with LLM(model, kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as single:
        want_logits = _prefill_logits(single)
        want = [o.token_ids for o in single.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    with LLM(model, tp_size=2, kv_cache_tokens=1024, graph_decode="piecewise", decode_sizes=[4],
             graph_prefill="piecewise", prefill_sizes=[64], max_prefill_tokens=64, graph_select="always",
             use_cache=False, compilation_config=compilation) as tp:
        got_logits = _prefill_logits(tp)
        got = [o.token_ids for o in tp.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
        stats = tp.stats()
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert got == want
    assert stats["decode"]["replays"] > 0 and stats["prefill"]["replays"] > 0
    assert stats["compile"]["passes"]["allreduce_rms_fusion"] > 0
    assert all(rank["shm"] > 0 for rank in stats["tp"]["communicators"])
