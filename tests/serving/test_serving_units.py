"""Units without a server. IncrementalDetokenizer: streamed deltas add up to the full decode, never carry half a
UTF-8 character, and stop strings are matched across token boundaries and never leak into a delta before they
are cut. `graphcap bench serve`'s percentiles and table."""

from __future__ import annotations

import pytest

from graphcap.serving.detokenizer import REPLACEMENT, IncrementalDetokenizer


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory, kit):
    from tokenizers import Tokenizer

    path = kit.build_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    return lambda ids: tok.decode(ids, skip_special_tokens=True), tok


def _stream(decode, ids, stop=(), count_only_last=False):
    d = IncrementalDetokenizer(decode, stop)
    deltas = []
    for i, t in enumerate(ids):
        d.add(t, count_only=count_only_last and i == len(ids) - 1)
        deltas.append(d.delta())
        if d.stopped:
            break
    d.flush()
    deltas.append(d.delta(final=True))
    return d, deltas


def test_deltas_add_up_to_the_full_decode(word_tokenizer):
    decode, tok = word_tokenizer
    ids = tok.encode("the cat sat on the mat and then it slept", add_special_tokens=False).ids + [2, 40, 41]
    d, deltas = _stream(decode, ids)
    assert "".join(deltas) == decode(ids) == d.text
    assert d.num_tokens == len(ids)


def test_stop_string_across_tokens_is_cut_and_never_streamed(word_tokenizer):
    decode, tok = word_tokenizer
    ids = tok.encode("the cat sat on the mat", add_special_tokens=False).ids
    d, deltas = _stream(decode, ids, stop=["at on"])  # "s|at| |on": spans three tokens
    assert d.stopped
    assert "".join(deltas) == "the cat s"
    assert d.num_tokens == 4  # the token that completed the stop string counts, later ones are never seen
    assert all("at on" not in x for x in deltas)


def test_earliest_stop_string_wins(word_tokenizer):
    decode, tok = word_tokenizer
    ids = tok.encode("the cat sat on the mat", add_special_tokens=False).ids
    d, deltas = _stream(decode, ids, stop=["mat", "sat"])
    assert "".join(deltas) == "the cat "


def test_stop_token_text_stays_out(word_tokenizer):
    decode, tok = word_tokenizer
    ids = tok.encode("the cat sat", add_special_tokens=False).ids
    d, deltas = _stream(decode, ids, count_only_last=True)
    assert "".join(deltas) == "the cat"
    assert d.num_tokens == 3


def test_hold_back_only_what_could_start_a_stop_string(word_tokenizer):
    decode, tok = word_tokenizer
    d = IncrementalDetokenizer(decode, ["xyz"])
    for t in tok.encode("the cat", add_special_tokens=False).ids:
        d.add(t)
    assert d.delta() == "the c"  # two characters could still begin "xyz"
    assert d.delta(final=True) == "at"


@pytest.mark.real_model
def test_byte_level_utf8_never_split():
    """SmolLM2's byte-level BPE splits these characters over several tokens each."""
    from graphcap.engine.tokenizer import Tokenizer
    from graphcap.executor.loader import resolve_source

    tok = Tokenizer(resolve_source("smollm2").tokenizer)
    text = "🎉🎉 こんにちは世界 naïve café ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(REPLACEMENT in tok.decode([i]) for i in ids), "expected tokens holding partial characters"
    d, deltas = _stream(tok.decode, ids)
    assert all(REPLACEMENT not in x for x in deltas)
    assert "".join(deltas) == text


def test_bench_percentiles_and_table():
    from graphcap.serving.bench import percentiles, render

    p = percentiles([0.001 * i for i in range(1, 101)])
    assert (round(p["p50"], 6), round(p["p90"], 6), round(p["p99"], 6)) == (50.0, 90.0, 99.0)
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}
    result = {"config": {"model": "m", "url": "u", "endpoint": "completions", "concurrency": 1, "requests": 1,
                         "max_tokens": 1},
              "summary": {"completed": 0, "requests": 1, "errors": 1, "duration_s": 1.0, "requests_per_s": 0.0,
                          "output_tokens_per_s": 0.0, "ttft_ms": percentiles([]), "itl_ms": percentiles([]),
                          "latency_ms": percentiles([])},
              "error_messages": {"HTTP 429: full": 1}}
    table = render(result)
    assert "TTFT (ms)" in table and "error x1: HTTP 429: full" in table


def test_llm_abort_request_frees_pages(tokenized_ckpt):
    """The engine hook the server uses: a waiting or running request ends at once, its pages back in the pool."""
    from graphcap import LLM, SamplingParams
    from graphcap.engine.request import Status

    with LLM(str(tokenized_ckpt.path), graph_decode="eager", graph_prefill="eager") as llm:
        pool = llm.scheduler.pool
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        a, b = (llm._make_request([1, 5, 6, 7] * 6, params) for _ in range(2))
        for r in (a, b):
            llm.scheduler.add(r)
        llm.step()
        assert a.status == b.status == Status.RUNNING and a.pages
        c = llm._make_request([1, 5, 6], params)
        llm.scheduler.add(c)
        llm.abort_request(c)
        assert (c.status, c.finish_reason, c in llm.scheduler.waiting) == (Status.FINISHED, "abort", False)
        llm.abort_request(a)
        assert (a.status, a.finish_reason, a.pages) == (Status.FINISHED, "abort", [])
        assert pool.free_pages == pool.usable_pages - len(b.pages)
        llm.abort_request(a)  # twice: no effect
        llm.step()
        assert len(b.output_ids) == 2 and a.output_ids == [a.output_ids[0]]
        llm.abort_request(b)
        assert pool.free_pages == pool.usable_pages and not llm.scheduler.running
        assert len(llm.generate(["the cat"], SamplingParams(max_new_tokens=3))[0].token_ids) == 3
