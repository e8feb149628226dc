"""graphcap's BERT against HF `BertModel` on tiny random checkpoints: prefixes, padding, TP=2, tracing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graphcap.executor.encoder_loader import build_encoder, load_encoder, resolve_encoder_source
from graphcap.executor.loader import iter_safetensors, safetensors_files
from graphcap.models.bert import BertConfig, BertModel, rename_bert_weight
from .helpers import run_tp2, save_hf, tiny_bert_config

transformers = pytest.importorskip("transformers")


def random_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask with the given true lengths (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.fixture(scope="module")
def hf_bert():
    torch.manual_seed(0)
    return transformers.BertModel(tiny_bert_config(), add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, hf_bert) -> Path:
    """On-disk names are the contract: transformers may rename modules in memory, not in saved files."""
    return save_hf(hf_bert, tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def ours(checkpoint: Path) -> BertModel:
    source = resolve_encoder_source(str(checkpoint))
    model = BertModel(BertConfig.from_hf(source.hf_config))
    loaded = model.load_weights(iter_safetensors(safetensors_files(checkpoint)))
    assert loaded == {n for n, _ in model.named_parameters()}
    return model.eval()


def test_forward_matches_hf_with_padding(hf_bert, ours: BertModel) -> None:
    ids, mask = random_batch(101, [1, 7, 16, 3])
    with torch.inference_mode():
        mine = ours(ids, mask)
        ref = hf_bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(mine[real], ref[real], atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak_into_real_tokens(ours: BertModel) -> None:
    ids, mask = random_batch(101, [5, 12])
    with torch.inference_mode():
        padded = ours(ids, mask)[0, :5]
        alone = ours(ids[:1, :5], mask[:1, :5])[0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_all_padding_row_is_finite_and_harmless(ours: BertModel) -> None:
    """Graph runners pad the batch with dummy rows; they must not produce NaN or disturb real rows."""
    ids, mask = random_batch(101, [6, 6])
    mask[1] = 0
    with torch.inference_mode():
        out = ours.embed(ids, mask)
        alone = ours.embed(ids[:1], mask[:1])
    assert bool(torch.isfinite(out).all())
    assert torch.allclose(out[0], alone[0], atol=1e-6)


def test_token_type_ids_follow_hf(hf_bert, ours: BertModel) -> None:
    ids, mask = random_batch(101, [9, 9])
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.inference_mode():
        mine = ours(ids, mask, types)
        ref = hf_bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert torch.allclose(mine, ref, atol=1e-5, rtol=1e-5)


def test_embed_is_masked_mean_normalised(ours: BertModel) -> None:
    ids, mask = random_batch(101, [3, 8])
    with torch.inference_mode():
        hidden = ours(ids, mask)
        emb = ours.embed(ids, mask)
    expected = torch.nn.functional.normalize(hidden[0, :3].mean(0), dim=-1)
    assert torch.allclose(emb[0], expected, atol=1e-6)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_prefixed_masked_lm_checkpoint_loads(tmp_path: Path) -> None:
    """BertForMaskedLM checkpoints carry "bert." names and an MLM head that must be skipped."""
    torch.manual_seed(2)
    hf = transformers.BertForMaskedLM(tiny_bert_config()).eval()
    save_hf(hf, tmp_path)
    source = resolve_encoder_source(str(tmp_path))
    assert source.architecture == "BertForMaskedLM" and source.tokenizer_path is None
    model = build_encoder(source, torch.float32, "cpu")
    ids, mask = random_batch(101, [4, 10])
    with torch.inference_mode():
        ref = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(model(ids, mask)[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_bf16_load_runs_close_to_fp32(checkpoint: Path, ours: BertModel) -> None:
    model = load_encoder(str(checkpoint), dtype=torch.bfloat16).model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids, mask = random_batch(101, [5, 11])
    with torch.inference_mode():
        cos = (model.embed(ids, mask).float() * ours.embed(ids, mask)).sum(-1)
    assert bool((cos > 0.99).all()), cos.tolist()


@pytest.mark.parametrize(
    ("hf_name", "ours_name", "shard"),
    [
        ("bert.encoder.layer.3.attention.self.key.weight", "layers.3.attn.qkv_proj.weight", "k"),
        ("encoder.layer.0.attention.self.query.bias", "layers.0.attn.qkv_proj.bias", "q"),
        ("encoder.layer.1.attention.output.LayerNorm.gamma", "layers.1.attn_norm.weight", None),
        ("encoder.layer.1.output.LayerNorm.beta", "layers.1.mlp_norm.bias", None),
        ("encoder.layer.2.output.dense.weight", "layers.2.mlp.down_proj.weight", None),
        ("encoder.layer.2.attention.output.dense.weight", "layers.2.attn.o_proj.weight", None),
        ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight", None),
    ],
)
def test_rename(hf_name: str, ours_name: str, shard: str | None) -> None:
    assert rename_bert_weight(hf_name) == (ours_name, shard)


def test_tensor_parallel_two_ranks_match_single(checkpoint: Path, ours: BertModel) -> None:
    """Heads, intermediate and vocabulary split over 2 ranks; the all-reduced output equals TP=1."""
    config = ours.config
    files = safetensors_files(checkpoint)
    ids, mask = random_batch(101, [4, 9, 2])

    def build() -> BertModel:
        model = BertModel(config)
        assert model.load_weights(iter_safetensors(files)) == {n for n, _ in model.named_parameters()}
        return model.eval()

    outputs = run_tp2(build, lambda m: m.embed(ids, mask))
    assert outputs[0].shape == (3, 32)
    with torch.inference_mode():
        expected = ours.embed(ids, mask)
    for out in outputs:
        assert torch.allclose(out, expected, atol=1e-5)


def test_traces_as_one_static_graph(ours: BertModel) -> None:
    """The encoder graph runner relies on Dynamo tracing the whole forward without graph breaks."""
    torch._dynamo.reset()
    compiled = torch.compile(ours.embed, backend="eager", fullgraph=True, dynamic=False)
    ids, mask = random_batch(101, [3, 8])
    with torch.inference_mode():
        assert torch.allclose(compiled(ids, mask), ours.embed(ids, mask), atol=1e-6)
