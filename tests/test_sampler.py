"""Token selection and stop conditions: the sampler on hand-made logits (where the right answer is known
from the distribution) and the engine's stop rules on a real checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcap import LLM, SamplingParams, UserError
from graphcap.engine.sampler import sample

finite_logits = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40).map(torch.tensor)


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [sample(logits.unsqueeze(0), [params], [gen])[0] for _ in range(n)]


# -- the sampler on known distributions ----------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(logits=st.lists(finite_logits, min_size=1, max_size=5, unique_by=len))
def test_greedy_is_row_argmax(logits):
    width = max(len(r) for r in logits)
    batch = torch.full((len(logits), width), -1e9)
    for i, row in enumerate(logits):
        batch[i, : len(row)] = row
    params = [SamplingParams()] * len(logits)
    assert sample(batch, params, [None] * len(logits)) == batch.argmax(-1).tolist()


@settings(max_examples=40, deadline=None)
@given(logits=finite_logits, temperature=st.floats(0.1, 5.0), seed=st.integers(0, 2**31))
def test_top_k_one_equals_greedy(logits, temperature, seed):
    p = SamplingParams(temperature=temperature, top_k=1, seed=seed)
    assert draw(logits, p, 3, seed) == [int(logits.argmax())] * 3


@settings(max_examples=40, deadline=None)
@given(logits=finite_logits, k=st.integers(2, 5), seed=st.integers(0, 2**31))
def test_top_k_only_draws_from_the_k_largest(logits, k, seed):
    allowed = set(torch.topk(logits, min(k, len(logits))).indices.tolist())
    kth = torch.topk(logits, min(k, len(logits))).values[-1]
    allowed |= set((logits == kth).nonzero().flatten().tolist())  # ties with the k-th are kept
    assert set(draw(logits, SamplingParams(temperature=1.5, top_k=k), 30, seed)) <= allowed


@settings(max_examples=40, deadline=None)
@given(logits=finite_logits, top_p=st.floats(0.05, 0.95), seed=st.integers(0, 2**31))
def test_top_p_only_draws_from_the_nucleus(logits, top_p, seed):
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    nucleus = set(order[mass_before < top_p + 1e-6].tolist())
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=top_p), 30, seed)) <= nucleus


def test_tiny_top_p_is_greedy():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=1e-6), 50)) == {1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_follow_softmax(temperature):
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7])
    n = 4000
    counts = torch.bincount(torch.tensor(draw(logits, SamplingParams(temperature=temperature), n)), minlength=4)
    expected = torch.softmax(logits / temperature, -1)
    assert (counts / n - expected).abs().max().item() < 0.03


@pytest.mark.parametrize("temperature", [1e-38, 1e-300])
def test_tiny_temperature_does_not_produce_nan(temperature):
    """fp32 logits / a tiny temperature overflow to inf (softmax: NaN); the sampler must return the argmax."""
    logits = torch.tensor([3.0, 5.0, -2.0])
    assert draw(logits, SamplingParams(temperature=temperature), 5) == [1] * 5


def test_sampling_needs_no_generator():
    logits = torch.tensor([0.0, 0.0, 0.0])
    assert sample(logits.unsqueeze(0), [SamplingParams(temperature=1.0)], [None])[0] in (0, 1, 2)


# -- the engine's seeds and stop rules -----------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), kv_cache_tokens=2048, graph_decode="eager", graph_prefill="eager") as engine:
        yield engine


def gen(llm: LLM, prompt: list[int], **kw) -> tuple[list[int], str]:
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(**kw))[0]
    return out.token_ids, out.finish_reason


PROMPT = [5, 17, 33, 101, 7]


def test_same_seed_same_tokens_different_seed_different(llm):
    a = gen(llm, PROMPT, temperature=1.0, seed=123, max_new_tokens=24, ignore_eos=True)[0]
    b = gen(llm, PROMPT, temperature=1.0, seed=123, max_new_tokens=24, ignore_eos=True)[0]
    c = gen(llm, PROMPT, temperature=1.0, seed=124, max_new_tokens=24, ignore_eos=True)[0]
    greedy = gen(llm, PROMPT, max_new_tokens=24, ignore_eos=True)[0]
    assert a == b
    assert a != c
    assert a != greedy, "temperature 1 on this model should leave the greedy path"


def test_seeded_request_unaffected_by_batch_neighbours(llm, kit):
    p = SamplingParams(temperature=1.0, seed=5, max_new_tokens=16, ignore_eos=True)
    solo = llm.generate(prompt_token_ids=[PROMPT], sampling_params=p)[0].token_ids
    others = kit.prompts(3, seed=20)
    params = [SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)] * 3 + [p]
    batched = llm.generate(prompt_token_ids=others + [PROMPT], sampling_params=params)[-1].token_ids
    assert batched == solo


@pytest.mark.parametrize("n", [1, 7])
def test_max_new_tokens(llm, n):
    tokens, reason = gen(llm, PROMPT, max_new_tokens=n, ignore_eos=True)
    assert len(tokens) == n and reason == "length"


def first_repeat_free_index(tokens: list[int]) -> int:
    """An index > 0 whose token does not occur earlier, so stopping on it cuts there exactly."""
    for i in range(1, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i
    raise AssertionError(f"no usable stop token in {tokens}")


def test_stop_token_ids(llm):
    full = gen(llm, PROMPT, max_new_tokens=20, ignore_eos=True)[0]
    i = first_repeat_free_index(full)
    tokens, reason = gen(llm, PROMPT, max_new_tokens=20, ignore_eos=True, stop_token_ids=[full[i]])
    assert tokens == full[: i + 1] and reason == "stop"


def test_eos_stops_unless_ignored(llama_ckpt, llm, tmp_path):
    """Make a token the greedy path produces the checkpoint's EOS: generation must stop there."""
    full = gen(llm, PROMPT, max_new_tokens=20, ignore_eos=True)[0]
    i = first_repeat_free_index(full)
    path = tmp_path / "eos"
    shutil.copytree(llama_ckpt.path, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [full[i], 0]  # a list of EOS ids, as Llama 3 checkpoints have
    (path / "config.json").write_text(json.dumps(cfg))
    with LLM(str(path), kv_cache_tokens=512, graph_decode="eager", graph_prefill="eager") as eos_llm:
        assert gen(eos_llm, PROMPT, max_new_tokens=20) == (full[: i + 1], "stop")
        assert gen(eos_llm, PROMPT, max_new_tokens=20, ignore_eos=True) == (full, "length")


def test_context_limit_ends_with_length(llama_ckpt):
    with LLM(str(llama_ckpt.path), kv_cache_tokens=512, max_model_len=16, graph_decode="eager", graph_prefill="eager") as small:
        tokens, reason = gen(small, list(range(3, 13)), max_new_tokens=50, ignore_eos=True)
    assert len(tokens) == 6 and reason == "length"


# -- validation ----------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(t=st.floats(max_value=-1e-9) | st.just(float("nan")))
def test_negative_or_nan_temperature_refused(t):
    with pytest.raises(UserError, match="temperature"):
        SamplingParams(temperature=t)


@settings(max_examples=30, deadline=None)
@given(top_p=st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True) | st.just(float("nan")))
def test_top_p_outside_unit_interval_refused(top_p):
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=top_p)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(top_k=-2),
                                dict(seed="x"), dict(stop_token_ids=[-1])])
def test_other_bad_values_refused(kw):
    with pytest.raises(UserError):
        SamplingParams(**kw)
