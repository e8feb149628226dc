"""SmolLM2-135M-Instruct from the package's GGUF: greedy chat replies equal HF transformers' (loading the
same file) in eager and in the default graph modes, and every default bucket holds on the real model."""

from __future__ import annotations

import pytest
import torch

from graphcap import SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

NEW_TOKENS = 48
# A divergence from HF counts as agreement only where HF's own two best logits at that step are this close:
# there the next token is decided by rounding, not by the model.
NEAR_TIE = 1e-3

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three primes."}],
    [{"role": "user", "content": "Explain what a CPU cache is in two sentences."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
    [{"role": "user", "content": "def fib(n):\n    # complete this Python function"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    [{"role": "user", "content": "List the days of the week in reverse order."}],
]


@pytest.fixture(scope="module")
def hf_replies(hf_smollm2, hf_smollm2_tokenizer):
    """HF's greedy reply to each conversation, with its logits at every step."""
    out = []
    for conv in CONVERSATIONS:
        ids = hf_smollm2_tokenizer.apply_chat_template(conv, add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            gen = hf_smollm2.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                      output_logits=True, return_dict_in_generate=True, pad_token_id=2)
        out.append((ids, gen.sequences[0, len(ids):].tolist(), [s[0] for s in gen.logits]))
    return out


def _agrees(ours: list[int], ref: list[int], logits: list[torch.Tensor]) -> tuple[bool, str]:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = torch.topk(logits[i].double(), 2).values
            gap = float(top2[0] - top2[1])
            return gap < NEAR_TIE, f"diverged at token {i} ({a} vs HF {b}), HF's top-2 gap {gap:.2e}"
    if len(ours) != len(ref):
        return False, f"lengths differ: {len(ours)} vs HF {len(ref)}"
    return True, "identical"


@pytest.mark.parametrize("engine", ["smollm2_eager", "smollm2_graphs"])
def test_greedy_chat_equals_hf(request, engine, hf_replies):
    llm = request.getfixturevalue(engine)
    outs = llm.chat(CONVERSATIONS, SamplingParams(max_new_tokens=NEW_TOKENS))
    for conv, out, (ids, ref, logits) in zip(CONVERSATIONS, outs, hf_replies):
        assert out.prompt_token_ids == ids, "chat template or tokenizer differs from HF's"
        ok, why = _agrees(out.token_ids, ref, logits)
        if why != "identical":
            print(f"{engine}: {conv[-1]['content'][:30]!r}: {why}")
        assert ok, why
    assert any(len(o.token_ids) > 8 for o in outs)


def test_every_default_bucket_holds(smollm2_graphs):
    """Each default bucket is verified (float64 reference) and kept, or dropped only as slower than eager (on
    its own timing, or, for prefill buckets above one that gained nothing, on that smaller bucket's)."""
    stats = smollm2_graphs.stats()
    for phase in ("decode", "prefill"):
        for size, bucket in stats[phase]["buckets"].items():
            assert bucket["status"] == "graph" or bucket["reason"] in (
                "bucket_slower_than_eager", "slower_on_another_batch_shape", "no_gain_at_smaller_bucket"), (
                phase, size, bucket)
            if bucket["reason"] != "no_gain_at_smaller_bucket":  # the others were verified, then timed
                assert bucket["error_ratio"] is not None and bucket["error_ratio"] < 8, (phase, size, bucket)
        assert stats[phase]["mode"] != "eager"
    assert stats["decode"]["captured"], "no decode bucket kept on the real model"


def test_graph_mode_serves_from_graphs(smollm2_graphs):
    before = smollm2_graphs.stats()
    smollm2_graphs.chat(CONVERSATIONS[:4], SamplingParams(max_new_tokens=8))
    after = smollm2_graphs.stats()
    assert after["decode"]["replays"] > before["decode"]["replays"]
