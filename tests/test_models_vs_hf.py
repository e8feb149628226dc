"""graphcap's eager forward against HF transformers on the same random checkpoints: greedy tokens must be
identical and fp32 logits must agree to 1e-4 (relative to the largest logit), for every architecture."""

from __future__ import annotations

import pytest
import torch

from graphcap import LLM, SamplingParams
from graphcap.batch.forward_batch import ForwardMode

NEW_TOKENS = 32


def hf_greedy(hf_model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """HF `generate(do_sample=False)` for exactly n tokens (EOS disabled so it cannot stop early)."""
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    hf_model.generation_config.eos_token_id = None  # else generate() merges the model's EOS back in
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), generation_config=gen_cfg)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == n, "HF stopped early; the comparison would be partial"
    return tokens


def our_prefill_logits(llm: LLM, batch_prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every prompt position from one ragged prefill batch, through the runner's ForwardBatch."""
    runner = llm.runner
    pool = runner.pool
    tables = [pool.alloc(pool.pages_for(len(p))) for p in batch_prompts]
    try:
        batch = runner.make_batch(ForwardMode.PREFILL, batch_prompts, [0] * len(batch_prompts), tables)
        with torch.inference_mode():
            logits = runner.model(batch.input_ids, batch.positions, batch.attn, None)
    finally:
        for t in tables:
            pool.free(t)
    return list(logits.split([len(p) for p in batch_prompts]))


@pytest.fixture(scope="module")
def hf_and_llm(any_checkpoint, kit):
    hf = kit.load_hf(any_checkpoint)
    with LLM(str(any_checkpoint.path), kv_cache_tokens=2048, page_size=8, graph_decode="eager", graph_prefill="eager") as llm:
        yield hf, llm


def test_greedy_tokens_match_hf_generate(hf_and_llm, kit):
    hf, llm = hf_and_llm
    batch = kit.prompts(4, seed=1, lo=2, hi=40)
    assert len({len(p) for p in batch}) > 1
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompt_token_ids=batch, sampling_params=params)]
    ref = [hf_greedy(hf, p, NEW_TOKENS) for p in batch]
    assert ours == ref
    # The comparison only means something if the model does not emit one token forever.
    for seq in ref:
        assert len(set(seq)) > 4, f"degenerate reference sequence {seq}"


def test_prefill_logits_match_hf(hf_and_llm, kit):
    hf, llm = hf_and_llm
    batch = kit.prompts(3, seed=2, lo=5, hi=60)
    ours = our_prefill_logits(llm, batch)
    for prompt, got in zip(batch, ours):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].float()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-4, f"max relative logit error {rel:.2e}"


def test_batched_equals_one_at_a_time(hf_and_llm, kit):
    _, llm = hf_and_llm
    batch = kit.prompts(5, seed=3, lo=1, hi=30)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(prompt_token_ids=batch, sampling_params=params)]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in batch]
    assert together == alone


def test_decode_logits_match_hf_after_cached_prefix(hf_and_llm, kit):
    """Logits of a decode step over a paged prefix equal HF's last-position logits on the full sequence."""
    hf, llm = hf_and_llm
    runner = llm.runner
    prompt = kit.prompts(1, seed=4, lo=20, hi=21)[0]
    table = runner.pool.alloc(runner.pool.pages_for(len(prompt)))
    try:
        pre = runner.make_batch(ForwardMode.PREFILL, [prompt[:-1]], [0], [table])
        runner.forward(pre)
        dec = runner.make_batch(ForwardMode.DECODE, [prompt[-1:]], [len(prompt) - 1], [table])
        got = runner.forward(dec)[0]
    finally:
        runner.pool.free(table)
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1].float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
