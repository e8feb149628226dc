"""Bad inputs through the Python API: each is a `UserError` with a message that names the problem, raised
before any work is done (never a TypeError/IndexError from deep inside the engine)."""

from __future__ import annotations

import pytest

from graphcap import LLM, SamplingParams, UserError


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as engine:
        yield engine


@pytest.fixture(scope="module")
def tok_llm(tokenized_ckpt):
    with LLM(str(tokenized_ckpt.path), kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as engine:
        yield engine


# -- the checkpoint ----------------------------------------------------------------------------------
def test_missing_checkpoint():
    with pytest.raises(UserError, match="neither a preset"):
        LLM("/nonexistent/ckpt")


def test_malformed_checkpoint(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        LLM(str(ckpt_copy), graph_decode="eager", graph_prefill="eager")


def test_unsupported_architecture(ckpt_copy, kit):
    kit.edit_config(ckpt_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UserError, match="unsupported architecture"):
        LLM(str(ckpt_copy), graph_decode="eager", graph_prefill="eager")


def test_malformed_tokenizer(ckpt_copy):
    (ckpt_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        LLM(str(ckpt_copy), graph_decode="eager", graph_prefill="eager")


@pytest.mark.parametrize("kw, match", [(dict(page_size=0), "page_size"), (dict(dtype="int8"), "dtype"),
                                       (dict(kv_cache_tokens=-1), "kv_cache_tokens"),
                                       (dict(no_such_option=1), "unknown engine option")])
def test_bad_engine_options(kw, match):
    with pytest.raises(UserError, match=match):
        LLM("tiny", **kw)


def test_nonpositive_max_model_len():
    with pytest.raises(UserError, match="max_model_len"):
        LLM("tiny", max_model_len=0, graph_decode="eager", graph_prefill="eager")


# -- the prompts -------------------------------------------------------------------------------------
def test_prompt_longer_than_context(llm, kit):
    with pytest.raises(UserError, match="context holds at most"):
        llm.generate(prompt_token_ids=[[5] * kit.MAX_POS])


def test_prompt_at_context_limit_minus_one_is_accepted(llama_ckpt, kit):
    with LLM(str(llama_ckpt.path), kv_cache_tokens=kit.MAX_POS + 8, graph_decode="eager", graph_prefill="eager") as big:
        out = big.generate(prompt_token_ids=[[5] * (kit.MAX_POS - 1)],
                           sampling_params=SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


@pytest.mark.parametrize("ids", [[[]], [[3, 4], []]])
def test_empty_prompt(llm, ids):
    with pytest.raises(UserError, match="empty"):
        llm.generate(prompt_token_ids=ids)


def test_empty_text_prompt(nobos_ckpt):
    """With a tokenizer that adds no BOS, "" encodes to nothing and must be refused like an empty id list."""
    with LLM(str(nobos_ckpt.path), kv_cache_tokens=64, graph_decode="eager", graph_prefill="eager") as engine:
        assert engine.tokenizer.encode("") == []
        with pytest.raises(UserError, match="prompt 1 is empty"):
            engine.generate(prompts=["the cat", ""])


@pytest.mark.parametrize("bad", [-1, 256, 10**9, 2.0, "7"])
def test_token_ids_outside_vocabulary(llm, bad):
    with pytest.raises(UserError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[5, bad, 6]])


def test_flat_token_id_list_is_a_user_error(llm):
    with pytest.raises(UserError):
        llm.generate(prompt_token_ids=[5, 6, 7])


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(UserError, match="has no tokenizer"):
        llm.generate(prompts="hello")


def test_both_or_neither_prompt_kinds(llm):
    with pytest.raises(UserError, match="exactly one"):
        llm.generate()
    with pytest.raises(UserError, match="exactly one"):
        llm.generate(prompts=["a"], prompt_token_ids=[[1]])


def test_non_string_text_prompt(tok_llm):
    with pytest.raises(UserError, match="must be strings"):
        tok_llm.generate(prompts=["the cat", 5])


def test_sampling_params_count_mismatch(llm):
    with pytest.raises(UserError, match="2 sampling params for 1 prompts"):
        llm.generate(prompt_token_ids=[[5]], sampling_params=[SamplingParams(), SamplingParams()])


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0)])
def test_bad_sampling_values(kw):
    with pytest.raises(UserError):
        SamplingParams(**kw)


def test_failed_generate_leaves_engine_usable(llm):
    with pytest.raises(UserError):
        llm.generate(prompt_token_ids=[[5, 6], [999]])
    assert not llm.scheduler.waiting and not llm.scheduler.running
    out = llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(max_new_tokens=2))
    assert len(out[0].token_ids) == 2


# -- text prompts (happy path, so the error cases above are not the only tokenizer coverage) ------------
def test_text_prompt_equals_token_prompt(tok_llm, kit):
    text = "the cat sat on the mat"
    ids = tok_llm.tokenizer.encode(text)
    assert ids[0] == kit.BOS and len(ids) == 7
    p = SamplingParams(max_new_tokens=10, ignore_eos=True)
    by_text = tok_llm.generate(prompts=text, sampling_params=p)[0]
    by_ids = tok_llm.generate(prompt_token_ids=[ids], sampling_params=p)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == tok_llm.tokenizer.decode(by_ids.token_ids) and by_text.text
