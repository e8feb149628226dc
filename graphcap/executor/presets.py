"""Built-in benchmark models (BENCHMARKS.md): random Llama weights from a fixed seed, no download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, vocab_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1536, vocab_size=32000),
}
SEED = 0


def preset_config(name: str) -> dict:
    """The HF-format config.json contents of a preset."""
    base = PRESETS[name]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **base,
        "head_dim": base["hidden_size"] // base["num_attention_heads"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def preset_weights(name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named random weights; the same seed gives the same model in every process."""
    cfg = preset_config(name)
    gen = torch.Generator().manual_seed(SEED)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    yield "model.embed_tokens.weight", rand(vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", rand(q, h)
        yield p + "self_attn.k_proj.weight", rand(kv, h)
        yield p + "self_attn.v_proj.weight", rand(kv, h)
        yield p + "self_attn.o_proj.weight", rand(h, q)
        yield p + "mlp.gate_proj.weight", rand(inter, h)
        yield p + "mlp.up_proj.weight", rand(inter, h)
        yield p + "mlp.down_proj.weight", rand(h, inter)
        yield p + "input_layernorm.weight", 1.0 + rand(h)
        yield p + "post_attention_layernorm.weight", 1.0 + rand(h)
    yield "model.norm.weight", 1.0 + rand(h)
    yield "lm_head.weight", rand(vocab, h)


def export_preset(name: str, directory: str | Path) -> Path:
    """Write a preset as an HF checkpoint (for peers such as HF transformers to load the same weights)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(preset_config(name), indent=2))
    save_file({k: v.contiguous() for k, v in preset_weights(name)}, str(out / "model.safetensors"))
    return out
