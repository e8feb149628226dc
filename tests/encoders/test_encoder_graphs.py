"""The encoder graph runner: buckets, padding, verification, reasons, capture context; MiniLM graphs vs HF.

Runner mechanics run on a tiny random BERT with the eager backend (no compile); the MiniLM tests compile one
(8 x 32) bucket with Inductor, once per module, and are marked slow.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from graphcap.distributed import parallel_state
from graphcap.executor.encoder_loader import load_encoder
from graphcap.graph.config import EncoderGraphConfig
from graphcap.graph.runners import base as runner_base
from graphcap.graph.runners import encoder as encoder_runner
from graphcap.graph.runners.encoder import EncoderGraphRunner, encoder_capture_context

from .helpers import needs_minilm, save_hf, tiny_bert_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    hf = transformers.BertModel(tiny_bert_config(), add_pooling_layer=False).eval()
    path = save_hf(hf, tmp_path_factory.mktemp("bert"))
    return load_encoder(str(path)).model


def make_runner(model, **cfg) -> EncoderGraphRunner:
    cfg = {"mode": "eager", "batch_sizes": (2, 4), "seq_lens": (8, 16), "select": "always", **cfg}
    return EncoderGraphRunner(model, EncoderGraphConfig(**cfg), torch.device("cpu"), max_seq_len=40)


def test_buckets_and_reasons(tiny_bert) -> None:
    runner = make_runner(tiny_bert)
    runner.capture()
    assert runner.buckets == [(2, 8), (2, 16), (4, 8), (4, 16)]
    assert runner.bucket_for(3, 9) == (4, 16) and runner.bucket_for(1, 1) == (2, 8)
    assert runner.can_run(4, 16) is None
    assert runner.can_run(5, 8) == "batch_too_large"
    assert runner.can_run(2, 17) == "seq_too_long"
    stats = runner.stats()
    assert stats["captured"] == ["2x8", "2x16", "4x8", "4x16"]
    assert set(stats["buckets"]) == {"2x8", "2x16", "4x8", "4x16"}
    assert all(b["status"] == "graph" and b["max_abs_diff"] < 1e-5 for b in stats["buckets"].values())


def test_seq_buckets_are_capped_by_the_model(tiny_bert) -> None:
    runner = make_runner(tiny_bert, seq_lens=(8, 64))  # the tiny model has 40 positions
    assert runner.seq_lens == [8]


@pytest.mark.parametrize("live,width", [(1, 3), (3, 16), (4, 5)])
def test_padded_replay_equals_unpadded_eager(tiny_bert, live: int, width: int) -> None:
    """Padding rows and columns to the bucket must not change the live rows (eager backend: same fn)."""
    runner = make_runner(tiny_bert)
    runner.capture()
    ids, mask = runner.random_inputs(live, width, full=False)
    with torch.inference_mode():
        out = runner.run(ids, mask)
        ref = tiny_bert.embed(ids, mask)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class WrongBackend:
    """Replays that are off by a constant: verification must catch them."""

    name = "wrong"

    def capture(self, fn, args, label, dynamic=()):
        return lambda current: fn(*current) + 1e-2

    def memory_bytes(self) -> int:
        return 0


def test_verification_rejects_wrong_graphs(tiny_bert, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_runner, "make_backend", lambda *a, **k: WrongBackend())
    runner = make_runner(tiny_bert, mode="full")
    runner.capture()
    assert runner.can_run(2, 8) == "bucket_rejected"
    assert runner.stats()["captured"] == []
    strict = make_runner(tiny_bert, mode="full", verify="strict")
    with pytest.raises(RuntimeError, match="less accurate than eager"):
        strict.capture()
    off = make_runner(tiny_bert, mode="full", verify="off")
    off.capture()
    assert off.can_run(2, 8) is None  # verify=off serves whatever was captured (the user asked for it)


def test_slower_buckets_fall_back_with_select_auto(tiny_bert, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_base.BucketedGraphRunner, "time_pair", lambda self, fa, fb: ([2.0] * 3, [1.0] * 3))
    runner = make_runner(tiny_bert, select="auto")
    runner.capture()
    assert runner.can_run(2, 8) == "bucket_slower_than_eager"


class RecordingTPGroup:
    """A stand-in TP group: two ranks by its word, identity collectives, and a capture that records entry."""

    world_size = 2
    rank_in_group = 0

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=-1):
        return x

    @contextlib.contextmanager
    def graph_capture(self):
        self.captures += 1
        yield

    @contextlib.contextmanager
    def graph_replay(self):
        self.replays += 1
        yield


@pytest.mark.parametrize("parallel,expect", [("tp", 1), ("dp", 0)])
def test_tp_capture_enters_the_communicator_capture_dp_does_not(tiny_bert, parallel: str, expect: int) -> None:
    group = RecordingTPGroup()
    saved = parallel_state.get_tp_group()
    parallel_state.set_tp_group(group)
    try:
        runner = make_runner(tiny_bert, parallel=parallel)
        runner.capture()
        assert group.captures == expect
        ids, mask = runner.random_inputs(2, 8, full=True)
        with torch.inference_mode():
            runner.run(ids, mask)
        assert group.replays == expect
        with encoder_capture_context(parallel):
            pass
        assert group.captures == 2 * expect
    finally:
        parallel_state.set_tp_group(saved)


def test_single_rank_tp_captures_in_a_plain_context() -> None:
    assert parallel_state.get_tp_group() is None
    assert isinstance(encoder_capture_context("tp"), contextlib.nullcontext)


# -- MiniLM, compiled ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph_llm():
    from graphcap import LLM

    return LLM("minilm", graph_encoder="full", encoder_sizes=[8], encoder_seq_lens=[32], graph_select="always")


@pytest.fixture(scope="module")
def eager_llm():
    from graphcap import LLM

    return LLM("minilm")


@pytest.fixture(scope="module")
def hf_minilm():
    from transformers import AutoModel, AutoTokenizer

    from graphcap.executor.encoder_loader import minilm_path

    path = str(minilm_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@needs_minilm
@pytest.mark.slow
def test_minilm_graph_matches_hf(graph_llm, hf_minilm) -> None:
    from .test_embed_api import VARIED, hf_reference

    ours = torch.tensor(graph_llm.embed(VARIED))
    ref = hf_reference(hf_minilm, VARIED)
    cosines = (ours * ref).sum(-1)
    assert bool((cosines >= 0.99999).all()), cosines.tolist()
    stats = graph_llm.stats()["encoder"]
    assert stats["captured"] == ["8x32"]
    assert stats["graph_batches"] >= 1 and stats["replays"] == stats["graph_batches"]
    assert stats["rejects"].get("seq_too_long", 0) >= 1  # the long sentences exceed the 32-token bucket


@needs_minilm
@pytest.mark.slow
def test_minilm_batches_beyond_the_buckets_are_counted(graph_llm) -> None:
    before = dict(graph_llm.stats()["encoder"]["rejects"])
    graph_llm.embed(["short text"] * 9)  # 9 rows: one chunk of 8 (graph) + 1 (graph)
    graph_llm.embed(["word " * 40])  # ~42 tokens > 32
    after = graph_llm.stats()["encoder"]["rejects"]
    assert after.get("seq_too_long", 0) == before.get("seq_too_long", 0) + 1
    runner = graph_llm._embedder.runner
    assert runner.can_run(9, 4) == "batch_too_large"


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None


if given is not None:

    @needs_minilm
    @pytest.mark.slow
    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(texts=st.lists(st.text(min_size=0, max_size=80), min_size=1, max_size=10))
    def test_minilm_graph_equals_eager_on_random_batches(graph_llm, eager_llm, texts: list[str]) -> None:
        graph = torch.tensor(graph_llm.embed(texts))
        eager = torch.tensor(eager_llm.embed(texts))
        torch.testing.assert_close(graph, eager, atol=1e-4, rtol=1e-4)


def test_encoder_bench_rows(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Row schema of the bench's encoder phase (eager backend standing in for a graph, so nothing compiles)."""
    from graphcap.bench.encoder import encoder_rows
    from graphcap.bench.report import format_tables
    from graphcap.cli import build_parser

    torch.manual_seed(0)
    hf = transformers.BertModel(tiny_bert_config(), add_pooling_layer=False).eval()
    path = save_hf(hf, tmp_path_factory.mktemp("bert_bench"))
    rows = encoder_rows(str(path), batch_sizes=(1, 2), seq_lens=(8,), iters=2, mode="eager")
    assert [(r["mode"], r["batch_size"], r["seq_len"]) for r in rows] == [
        ("eager", 1, 8), ("eager", 1, 8), ("eager", 2, 8), ("eager", 2, 8)
    ]
    for r in rows:
        assert r["phase"] == "encoder" and r["tokens_equal"] is None and r["ms_median"] > 0
        assert r["speedup_vs_eager"] > 0 and r["max_abs_diff"] < 1e-5
    assert "Encoder" in format_tables(rows)
    assert build_parser().parse_args(["bench", "--model", "tiny", "--encoder", "minilm"]).encoder == "minilm"
