"""Encoders with tp_size=2 through the public API, on ranks graphcap starts itself: MiniLM eager and with
graphs (tp and dp) equal tp_size=1, a random ViT equals tp_size=1, and user errors leave the ranks serving.

Every LLM with tp_size=2 here spawns two ranks that each load the model; graph tests compile small buckets
in every rank.
"""

from __future__ import annotations

import pytest
import torch

from graphcap import LLM, UserError
from graphcap.config import config_from_kwargs
from graphcap.engine.embedder import Embedder
from graphcap.engine.tp_embedder import TPEmbedder

from .helpers import needs_minilm, save_hf, tiny_vit_config

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

LONG = " ".join(f"token{i} is followed by word number {i + 1}." for i in range(12))  # beyond a 16-token bucket
TEXTS = [
    "hi",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve façade — 東京タワー, привет 😀",
    "Numbers: 3.14159, 2,718; 1e-9 and -42%.",
    "graph graph graph graph",
    "a b c d e f",
    LONG,
]
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def want() -> torch.Tensor:
    with LLM("minilm") as single:
        return torch.tensor(single.embed(TEXTS))


def assert_same_vectors(got: torch.Tensor, want: torch.Tensor) -> None:
    cosines = (got * want).sum(-1)
    assert bool((cosines >= MIN_COSINE).all()), cosines.tolist()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_minilm
def test_minilm_tp2_eager_equals_tp1_and_user_errors_keep_the_ranks(want: torch.Tensor) -> None:
    with LLM("minilm", tp_size=2) as tp:
        assert isinstance(tp._embedder, TPEmbedder)
        assert_same_vectors(torch.tensor(tp.embed(TEXTS)), want)
        for bad, match in (({"texts": [1, 2]}, "must be strings"), ({"texts": []}, "no texts"),
                           ({}, "exactly one"), ({"images": torch.zeros(1, 3, 8, 8)}, "text encoder")):
            with pytest.raises(UserError, match=match):
                tp.embed(**bad)
        assert all(p.is_alive() for p in tp._embedder.group.procs)
        assert_same_vectors(torch.tensor(tp.embed(TEXTS[::-1])), want.flip(0))
        stats = tp.stats()
    assert stats["encoder"]["parallel"] == "tp" and stats["encoder"]["inputs"] == 2 * len(TEXTS)
    assert stats["tp"]["world_size"] == 2
    for rank in stats["tp"]["communicators"]:
        assert rank["torch_dist"] > 0 and rank["shm"] == 0  # sharded and all-reduced, never in capture mode
    assert not any(p.is_alive() for p in tp._embedder.group.procs)  # shutdown stopped the ranks


@needs_minilm
def test_a_user_error_while_ranks_build_reaches_the_caller() -> None:
    with pytest.raises(UserError, match="graph_encoder="):
        LLM("minilm", tp_size=2, graph_decode="full")


@needs_minilm
def test_a_directly_built_embedder_joins_its_process_group_or_refuses() -> None:
    """Only `LLM` starts or joins ranks; an Embedder built directly uses the group installed in its process."""
    with pytest.raises(UserError, match="joins its TP group"):
        Embedder(config_from_kwargs("minilm", {"tp_size": 2}))


@needs_minilm
def test_minilm_tp2_graphs_equal_tp1_and_collectives_take_the_capture_path(want: torch.Tensor) -> None:
    """All-reduces inside the graphs take the shared-memory capture path at capture and at replay; the eager
    fallback (LONG, beyond every bucket) takes the torch.distributed one."""
    with LLM("minilm", tp_size=2, graph_encoder="full", encoder_sizes=[2, 4], encoder_seq_lens=[16],
             graph_select="always") as tp:
        captured = tp.stats()["tp"]["communicators"]
        assert_same_vectors(torch.tensor(tp.embed(TEXTS)), want)
        stats = tp.stats()
    encoder = stats["encoder"]
    assert encoder["parallel"] == "tp" and encoder["captured"] == ["2x16", "4x16"]
    assert encoder["graph_batches"] == 2 and encoder["replays"] == 2  # 7 short texts: chunks of 4 and 3
    assert encoder["rejects"] == {"seq_too_long": 1} and encoder["eager_batches"] == 1
    for before, after in zip(captured, stats["tp"]["communicators"]):
        assert before["shm"] > 0 and before["torch_dist"] == 0  # capture and verification
        assert after["shm"] > before["shm"] and after["torch_dist"] > 0


@needs_minilm
def test_minilm_dp2_graphs_equal_tp1_without_collectives(want: torch.Tensor) -> None:
    """Data-parallel: each rank captures and runs the whole encoder outside the group's capture, on its own
    share of the inputs (an input list shorter than the ranks leaves a rank idle)."""
    with LLM("minilm", tp_size=2, graph_encoder="full", encoder_sizes=[4], encoder_seq_lens=[16],
             graph_select="always", encoder_parallel="dp") as dp:
        assert_same_vectors(torch.tensor(dp.embed(TEXTS)), want)
        assert_same_vectors(torch.tensor(dp.embed(TEXTS[:1])), want[:1])
        stats = dp.stats()
    assert stats["encoder"]["parallel"] == "dp" and stats["encoder"]["graph_batches"] == 2  # rank 0: 4 + 1 texts
    assert stats["tp"]["inputs"] == [len(TEXTS) // 2 + 1, len(TEXTS) - len(TEXTS) // 2]
    assert all(rank["shm"] == rank["torch_dist"] == 0 for rank in stats["tp"]["communicators"])


def test_vit_tp2_equals_tp1(tmp_path) -> None:
    torch.manual_seed(0)
    path = save_hf(transformers.ViTModel(tiny_vit_config(), add_pooling_layer=False).eval(), tmp_path)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with LLM(str(path)) as single:
        want = torch.tensor(single.embed(images=pixels))
    with LLM(str(path), tp_size=2) as tp:
        got = torch.tensor(tp.embed(images=pixels))
        with pytest.raises(UserError, match="expects"):
            tp.embed(images=torch.zeros(1, 3, 16, 16))
        as_list = torch.tensor(tp.embed(images=list(pixels)))
        stats = tp.stats()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(as_list, got)
    assert not pixels.is_shared()  # the ranks got a copy; the caller's tensor keeps its own storage
    assert all(rank["torch_dist"] > 0 for rank in stats["tp"]["communicators"])  # the layers were sharded
