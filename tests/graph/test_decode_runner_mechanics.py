"""Decode runner mechanics on the eager backend (no compiling): padding, buckets, reasons, verification
and selection. The backend is swapped, the runner is the production one."""

from __future__ import annotations

import time

import pytest
import torch

from graphcap import LLM
from graphcap.graph.config import DecodeGraphConfig
from graphcap.graph.probe import ProbeBatches
from graphcap.graph.runners.decode import DecodeGraphRunner


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    with LLM(str(llama_ckpt.path), kv_cache_tokens=2048, graph_decode="eager", graph_prefill="eager") as engine:
        yield engine


def make_runner(llm, **cfg) -> DecodeGraphRunner:
    config = DecodeGraphConfig(mode="eager", sizes=(2, 4), select="always", **cfg)
    return DecodeGraphRunner(llm.runner, config, max_running_requests=8, max_model_len=llm.max_model_len)


def test_replay_pads_to_bucket_and_equals_eager(llm) -> None:
    """Not bitwise: the padded batch changes matmul blocking and the step inlines attention's torch code."""
    runner = make_runner(llm)
    runner.capture()
    probes = ProbeBatches(llm.runner, seed=7)
    try:
        for bs in (1, 2, 3, 4):
            batch = probes.decode(bs, max_context=40)
            assert runner.can_run(batch) is None
            out = runner.run(batch)
            assert out.shape == (bs, llm.model_config.vocab_size)
            ref = llm.runner.forward_eager(batch)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
    finally:
        probes.release()
    assert runner.stats()["replays"] == 4
    assert runner.stats()["captured"] == [2, 4]


def test_refusals_say_why(llm) -> None:
    runner = make_runner(llm)
    runner.capture()
    probes = ProbeBatches(llm.runner, seed=8)
    try:
        assert runner.can_run(probes.decode(5, max_context=10)) == "batch_too_large"
        prefill = probes.prefill([3, 4], [0, 0])
        assert runner.can_run(prefill) == "not_decode"
    finally:
        probes.release()


def test_mismatching_bucket_is_dropped_with_reason_or_raises_when_strict(llm, monkeypatch, caplog) -> None:
    runner = make_runner(llm)
    original = runner.backend.capture

    def corrupt(fn, args, label, dynamic=()):
        replay = original(fn, args, label, dynamic)
        return (lambda current: replay(current) + 1e-2) if "bs=4" in label else replay

    monkeypatch.setattr(runner.backend, "capture", corrupt)
    runner.capture()
    stats = runner.stats()
    assert stats["captured"] == [2]
    assert stats["buckets"][4]["status"] == "rejected" and stats["buckets"][4]["reason"] == "bucket_rejected"
    assert "graph less accurate than eager" in caplog.text
    probes = ProbeBatches(llm.runner, seed=9)
    try:
        assert runner.can_run(probes.decode(3, max_context=10)) == "bucket_rejected"
    finally:
        probes.release()

    strict = make_runner(llm, verify="strict")
    monkeypatch.setattr(strict.backend, "capture", corrupt)
    with pytest.raises(RuntimeError, match="less accurate than eager"):
        strict.capture()


def test_auto_select_keeps_eager_where_the_graph_is_slower(llm, monkeypatch) -> None:
    runner = DecodeGraphRunner(
        llm.runner, DecodeGraphConfig(mode="eager", sizes=(2,), select="auto"), 8, llm.max_model_len
    )
    original = runner.backend.capture

    def slow(fn, args, label, dynamic=()):
        replay = original(fn, args, label, dynamic)

        def slow_replay(current):
            time.sleep(0.02)
            return replay(current)

        return slow_replay

    monkeypatch.setattr(runner.backend, "capture", slow)
    runner.capture()
    bucket = runner.stats()["buckets"][2]
    assert bucket["status"] == "eager" and bucket["reason"] == "bucket_slower_than_eager"
    assert bucket["graph_ms"] > bucket["eager_ms"]
