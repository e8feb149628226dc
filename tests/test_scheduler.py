"""Continuous batching under pressure: more requests than the KV cache holds, preemption, chunked prefill,
and the scheduler's batch formation and page accounting in isolation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcap import LLM, SamplingParams
from graphcap.engine.request import Request, Status
from graphcap.engine.scheduler import ScheduledBatch, Scheduler
from graphcap.batch.forward_batch import ForwardMode
from graphcap.executor.kv_cache import PagePool


@pytest.fixture(scope="module")
def roomy(llama_ckpt):
    """An engine with room for everything: the reference for 'running alone'."""
    with LLM(str(llama_ckpt.path), kv_cache_tokens=4096, page_size=4, graph_decode="eager", graph_prefill="eager") as llm:
        yield llm


def alone(llm: LLM, batch: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [llm.generate(prompt_token_ids=[p], sampling_params=sp)[0].token_ids for p, sp in zip(batch, params)]


# -- end to end ----------------------------------------------------------------------------------------
def test_flood_completes_in_order_and_equals_alone(llama_ckpt, roomy, kit):
    batch = kit.prompts(10, seed=10, lo=3, hi=16)
    # Mixed greedy and seeded sampling: a preempted sampled request must not re-draw its tokens.
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.0 if i % 2 else 0.9, seed=i)
              for i in range(len(batch))]
    with LLM(str(llama_ckpt.path), kv_cache_tokens=64, page_size=4, max_running_requests=4,
             max_prefill_tokens=24, graph_decode="eager", graph_prefill="eager") as llm:
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params)
        stats = llm.stats()
        assert stats["kv_cache"]["free_pages"] == stats["kv_cache"]["pages"], "pages leaked"
        assert not llm.scheduler.running and not llm.scheduler.waiting
    assert [o.prompt_token_ids for o in outs] == batch
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in outs)
    assert [o.token_ids for o in outs] == alone(roomy, batch, params)


def test_preemption_is_forced_and_harmless(llama_ckpt, roomy, kit):
    # 6 usable pages of 4 tokens; two 8-token prompts growing to 20 tokens need 10 pages together.
    batch = kit.prompts(2, seed=11, lo=8, hi=9)
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, seed=7),
              SamplingParams(max_new_tokens=12, ignore_eos=True)]
    with LLM(str(llama_ckpt.path), kv_cache_tokens=24, page_size=4, graph_decode="eager", graph_prefill="eager") as llm:
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params)
        assert llm.stats()["preemptions"] > 0
        assert llm.stats()["kv_cache"]["free_pages"] == 6
    assert [o.token_ids for o in outs] == alone(roomy, batch, params)


def test_chunked_prefill_equals_unchunked(llama_ckpt, roomy, kit):
    batch = kit.prompts(3, seed=12, lo=20, hi=40)
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * 3
    with LLM(str(llama_ckpt.path), kv_cache_tokens=1024, page_size=4, max_prefill_tokens=7, graph_decode="eager", graph_prefill="eager") as llm:
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params)
        # every prompt is longer than the budget, so it must have been split over several steps
        assert llm.stats()["prefill_steps"] >= sum(len(p) for p in batch) // 7
    unchunked = [o.token_ids for o in roomy.generate(prompt_token_ids=batch, sampling_params=params)]
    assert [o.token_ids for o in outs] == unchunked


def test_request_too_big_for_cache_is_refused_up_front(llama_ckpt):
    from graphcap import UserError

    with LLM(str(llama_ckpt.path), kv_cache_tokens=16, page_size=4, graph_decode="eager", graph_prefill="eager") as llm:
        with pytest.raises(UserError, match="kv_cache_tokens"):
            llm.generate(prompt_token_ids=[[5] * 10], sampling_params=SamplingParams(max_new_tokens=20))


# -- PagePool ----------------------------------------------------------------------------------------
def test_page_pool_basics():
    pool = PagePool(5, page_size=4)
    assert pool.usable_pages == 4 and pool.free_pages == 4
    assert [pool.pages_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    a = pool.alloc(3)
    assert a is not None and 0 not in a and len(set(a)) == 3
    assert pool.alloc(2) is None and pool.free_pages == 1, "a failed alloc must take nothing"
    pool.free(a)
    assert pool.free_pages == 4
    assert sorted(pool.alloc(4)) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        PagePool(1, page_size=4)


@settings(max_examples=50, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=40))
def test_page_pool_never_double_allocates(ops):
    pool = PagePool(9, page_size=2)
    held: list[list[int]] = []
    for do_alloc, n in ops:
        if do_alloc or not held:
            before = pool.free_pages
            got = pool.alloc(n)
            if n > before:
                assert got is None and pool.free_pages == before
            else:
                held.append(got)
        else:
            pool.free(held.pop(n % len(held)))
        owned = [p for pages in held for p in pages]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert 0 not in owned, "the padding page was handed out"
        assert len(owned) + pool.free_pages == pool.usable_pages


# -- Scheduler batch formation -------------------------------------------------------------------------
def req(rid: int, n_prompt: int, max_new: int = 4) -> Request:
    return Request(rid=rid, prompt_ids=list(range(10, 10 + n_prompt)), params=SamplingParams(max_new_tokens=max_new))


def advance(batch: ScheduledBatch, token: int = 99) -> None:
    """What LLM.step does after the forward: mark tokens cached, append a token where one was sampled."""
    for r, ids, s in zip(batch.requests, batch.token_ids, batch.sample):
        r.num_cached += len(ids)
        if s:
            r.output_ids.append(token)


def test_prefill_respects_token_budget_and_chunks():
    sched = Scheduler(PagePool(64, 4), max_running_requests=8, max_prefill_tokens=10)
    a, b, c = req(1, 6), req(2, 6), req(3, 10)
    for r in (a, b, c):
        sched.add(r)
    first = sched.schedule()
    assert first.mode == ForwardMode.PREFILL
    assert first.requests == [a, b]
    assert first.token_ids == [a.prompt_ids, b.prompt_ids[:4]]
    assert first.prefix_lens == [0, 0] and first.sample == [True, False]
    advance(first)
    second = sched.schedule()
    assert second.mode == ForwardMode.PREFILL
    assert second.requests == [b, c]
    assert second.token_ids == [b.prompt_ids[4:], c.prompt_ids[:8]]
    assert second.prefix_lens == [4, 0] and second.sample == [True, False]


def test_decode_batch_after_prefill():
    sched = Scheduler(PagePool(64, 4), max_running_requests=8, max_prefill_tokens=100)
    a, b = req(1, 5), req(2, 3)
    sched.add(a)
    sched.add(b)
    advance(sched.schedule(), token=42)
    dec = sched.schedule()
    assert dec.mode == ForwardMode.DECODE
    assert dec.requests == [a, b]
    assert dec.token_ids == [[42], [42]]
    assert dec.prefix_lens == [5, 3] and dec.sample == [True, True]
    assert all(len(r.pages) * 4 >= r.num_tokens for r in (a, b))


def test_max_running_requests_limits_admission():
    sched = Scheduler(PagePool(64, 4), max_running_requests=2, max_prefill_tokens=100)
    reqs = [req(i, 3) for i in range(1, 5)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    assert batch.requests == reqs[:2]
    assert [r.status for r in reqs] == [Status.RUNNING] * 2 + [Status.WAITING] * 2
    advance(batch)
    sched.finish(reqs[0], "length")
    nxt = sched.schedule()
    assert nxt.mode == ForwardMode.PREFILL and nxt.requests == [reqs[2]]


def test_decode_preempts_newest_when_pages_run_out():
    pool = PagePool(3, 4)  # 2 usable pages
    sched = Scheduler(pool, max_running_requests=8, max_prefill_tokens=100)
    a, b = req(1, 4), req(2, 4)
    sched.add(a)
    sched.add(b)
    advance(sched.schedule())  # both prompts fill their one page exactly
    assert pool.free_pages == 0
    dec = sched.schedule()  # a needs a second page: b (newest) is preempted to free one
    assert dec.mode == ForwardMode.DECODE and dec.requests == [a]
    assert b.status == Status.WAITING and b.pages == [] and b.num_cached == 0
    assert sched.preemptions == 1 and list(sched.waiting) == [b]
    assert len(a.pages) == 2


def test_preempted_request_recomputes_prompt_and_outputs():
    pool = PagePool(3, 4)
    sched = Scheduler(pool, max_running_requests=8, max_prefill_tokens=100)
    a, b = req(1, 4), req(2, 4)
    sched.add(a)
    sched.add(b)
    advance(sched.schedule(), token=7)
    sched.schedule()  # preempts b
    sched.finish(a, "length")
    again = sched.schedule()
    assert again.mode == ForwardMode.PREFILL and again.requests == [b]
    assert again.token_ids == [b.prompt_ids + [7]] and again.prefix_lens == [0] and again.sample == [True]


def test_generate_steps_match_scheduler_invariants(llama_ckpt, kit):
    """Drive LLM.step by hand and check that page ownership stays disjoint at every step."""
    with LLM(str(llama_ckpt.path), kv_cache_tokens=40, page_size=4, max_running_requests=3,
             max_prefill_tokens=9, graph_decode="eager", graph_prefill="eager") as llm:
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        reqs = [llm._make_request(p, params) for p in kit.prompts(6, seed=13, lo=4, hi=12)]
        for r in reqs:
            llm.scheduler.add(r)
        steps = 0
        while any(r.status != Status.FINISHED for r in reqs):
            llm.step()
            steps += 1
            owned = [p for r in llm.scheduler.running for p in r.pages]
            assert len(owned) == len(set(owned)) and 0 not in owned
            assert len(owned) + llm.runner.pool.free_pages == llm.runner.pool.usable_pages
            assert len(llm.scheduler.running) <= 3
            assert steps < 500
        assert all(len(r.output_ids) == 8 for r in reqs)
        assert torch.tensor([r.preemptions for r in reqs]).sum().item() == llm.stats()["preemptions"]
