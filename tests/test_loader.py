"""Checkpoint loading: safetensors only (pickle is refused without being opened), clear errors for broken
checkpoints, sharded indexes, and deterministic presets."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphcap import LLM, SamplingParams, UserError
from graphcap.executor.loader import build_model, resolve_source
from graphcap.executor.presets import export_preset


def load(path: Path | str) -> torch.nn.Module:
    return build_model(resolve_source(str(path)), torch.float32, torch.device("cpu"))


class _SideEffect:
    """Unpickling this creates a marker file: proof that somebody unpickled the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_evil_bin(directory: Path, marker: Path) -> None:
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_SideEffect(marker)))


def test_evil_bin_really_has_a_side_effect(tmp_path):
    """Guard for the tests below: the payload does what they assume when it is unpickled."""
    marker = tmp_path / "marker"
    write_evil_bin(tmp_path, marker)
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes()).close()
    assert marker.exists()


def test_pickle_only_checkpoint_refused_without_unpickling(ckpt_copy, tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    (ckpt_copy / "model.safetensors").unlink()
    write_evil_bin(ckpt_copy, marker)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(UserError, match=r"(?i)pickle.*\n?.*convert") as err:
        LLM(str(ckpt_copy), graph_decode="eager", graph_prefill="eager")
    assert "save_pretrained" in str(err.value) and "safe_serialization" in str(err.value)
    assert not marker.exists()


def test_safetensors_preferred_over_bin_which_is_never_opened(ckpt_copy, tmp_path):
    marker = tmp_path / "unpickled"
    write_evil_bin(ckpt_copy, marker)
    load(ckpt_copy)
    assert not marker.exists()


def test_missing_directory():
    with pytest.raises(UserError, match="neither a preset"):
        resolve_source("/nonexistent/graphcap/model")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="neither a directory .HF checkpoint. nor a .gguf file"):
        resolve_source(str(f))


def test_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        resolve_source(str(ckpt_copy))


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_malformed_config(ckpt_copy, text, match):
    (ckpt_copy / "config.json").write_text(text)
    with pytest.raises(UserError, match=match):
        resolve_source(str(ckpt_copy))


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size=None), "hidden_size"),
    (dict(hidden_size="wide"), "malformed"),
    (dict(num_attention_heads=0), "num_attention_heads|malformed|positive"),
    (dict(num_key_value_heads=3), "multiple"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(architectures=None), "architectures"),
    (dict(architectures="LlamaForCausalLM"), "architectures"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported rope"),
    (dict(rope_scaling="llama3"), "malformed"),
])
def test_bad_config_values(ckpt_copy, kit, changes, match):
    kit.edit_config(ckpt_copy, **changes)
    with pytest.raises(UserError, match=match):
        load(ckpt_copy)


def copy_of(checkpoint, name: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(checkpoint(name).path, tmp_path / name))


def test_qwen2_biases_load_whatever_attention_bias_says(checkpoint, kit, tmp_path):
    """Qwen2 always has q/k/v biases; a config.json saying attention_bias=false must not drop them."""
    path = copy_of(checkpoint, "qwen2", tmp_path)
    kit.edit_config(path, attention_bias=False)
    a, b = load(path).state_dict(), load(checkpoint("qwen2").path).state_dict()
    assert a["layers.0.self_attn.qkv_proj.bias"].abs().sum() > 0
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_transformers4_rope_scaling_format(checkpoint, kit, tmp_path):
    """Older checkpoints spell llama3 scaling as top-level rope_scaling + rope_theta; same model either way."""
    path = copy_of(checkpoint, "llama3_rope", tmp_path)
    params = json.loads((path / "config.json").read_text())["rope_parameters"]
    theta = params.pop("rope_theta")
    kit.edit_config(path, rope_parameters=None, rope_scaling=params, rope_theta=theta)
    old = load(path).layers[0].self_attn.rotary
    new = load(checkpoint("llama3_rope").path).layers[0].self_attn.rotary
    plain = load(checkpoint("llama_gqa").path).layers[0].self_attn.rotary
    assert torch.equal(old.cos_sin_cache, new.cos_sin_cache)
    assert not torch.allclose(new.cos_sin_cache, plain.cos_sin_cache), "llama3 scaling had no effect"


def test_unsupported_architecture(ckpt_copy, kit):
    kit.edit_config(ckpt_copy, architectures=["MambaForCausalLM"])
    with pytest.raises(UserError, match="unsupported architecture 'MambaForCausalLM'"):
        load(ckpt_copy)


def test_no_weights_at_all(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no \\*.safetensors"):
        resolve_source(str(ckpt_copy))


def rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                  "model.norm.weight", "lm_head.weight"])
def test_missing_weight_reported(ckpt_copy, name):
    """Also for one part of a stacked (qkv / gate_up) parameter, which would otherwise stay silently zero."""
    rewrite_weights(ckpt_copy, lambda t: t.pop(name))
    ours = name.removeprefix("model.").replace("k_proj", "qkv_proj").replace("up_proj", "gate_up_proj")
    with pytest.raises(UserError, match=f"missing 1 weights: {ours}"):
        load(ckpt_copy)


def test_unexpected_weight_reported(ckpt_copy):
    """An o_proj bias the model would not apply must be an error, not silently wrong output."""
    rewrite_weights(ckpt_copy, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.ones(64)}))
    with pytest.raises(UserError, match="o_proj.bias"):
        load(ckpt_copy)


@pytest.mark.parametrize("name, shape", [("model.layers.0.self_attn.q_proj.weight", (64, 32)),
                                         ("model.embed_tokens.weight", (200, 64)),
                                         ("model.layers.0.input_layernorm.weight", (32,))])
def test_wrong_shape_reported(ckpt_copy, name, shape):
    rewrite_weights(ckpt_copy, lambda t: t.update({name: torch.zeros(shape)}))
    with pytest.raises(UserError, match="does not fit"):
        load(ckpt_copy)


def test_corrupt_safetensors(ckpt_copy):
    data = (ckpt_copy / "model.safetensors").read_bytes()
    (ckpt_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read"):
        load(ckpt_copy)


def test_sharded_index_loads_same_model(sharded_ckpt, llama_ckpt):
    sharded, single = load(sharded_ckpt.path), load(llama_ckpt.path)
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_index_naming_missing_shard(sharded_ckpt, tmp_path):
    import shutil

    path = tmp_path / "sharded"
    shutil.copytree(sharded_ckpt.path, path)
    victim = sorted(path.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(UserError, match=f"missing: {victim.name}"):
        resolve_source(str(path))


def test_malformed_index(sharded_ckpt, tmp_path):
    import shutil

    path = tmp_path / "sharded"
    shutil.copytree(sharded_ckpt.path, path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(UserError, match="malformed"):
        resolve_source(str(path))


def test_preset_tiny_is_deterministic(tmp_path):
    a, b = load("tiny"), load("tiny")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(sa[k].abs().sum() > 0 for k in sa if "layers.15" in k), "the last layer was not loaded"
    # Exported to disk, the preset is the same model as the built-in one.
    exported = load(export_preset("tiny", tmp_path / "tiny"))
    se = exported.state_dict()
    assert all(torch.equal(sa[k], se[k]) for k in sa)


def test_preset_generation_is_deterministic():
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outs = []
    for _ in range(2):
        with LLM("tiny", kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as llm:
            outs.append(llm.generate(prompt_token_ids=[[1, 2, 3, 4]], sampling_params=p)[0].token_ids)
    assert outs[0] == outs[1]


def test_bfloat16_model_runs(llama_ckpt):
    """bf16 weights with the norms built in fp32 used to hand fp32 activations to bf16 linears."""
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with LLM(str(llama_ckpt.path), dtype="bfloat16", kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as llm:
        assert all(t.dtype == torch.bfloat16 for t in llm.runner.model.state_dict().values())
        assert len(llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=p)[0].token_ids) == 4


def test_untied_lm_head_is_stored_column_major_on_cpu_with_the_checkpoint_values(tmp_path):
    """A layout change only: the head's values are the checkpoint's, seen through a transposed view."""
    path = export_preset("tiny", tmp_path / "tiny")
    model = build_model(resolve_source(str(path)), torch.float32, torch.device("cpu"))
    head = model.lm_head.weight
    want = load_file(str(path / "model.safetensors"))["lm_head.weight"]
    assert head.t().is_contiguous() and not head.is_contiguous()
    assert torch.equal(head, want)
    hidden = torch.randn(3, head.shape[1])
    torch.testing.assert_close(model.lm_head.compute_logits(hidden), hidden @ want.t(), atol=1e-5, rtol=1e-5)
