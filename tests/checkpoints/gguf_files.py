"""Small GGUF checkpoints written by the tests with the `gguf` package's writer, as llama.cpp's converter
lays them out (llama's q/k rows permuted for pair-wise rotary, 1-D tensors in F32), from an HF model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module path>.<weight|bias>
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: rotary halves of each head interleaved into pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for 255 bytes plus one merged token "ab" (a 256-token vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(255)] + ["ab"]


def random_k_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """Q6_K blocks with random quants and sub-scales and a small fp16 super-scale (the gguf package can
    dequantise K-quants but not write them): [rows, cols / 256 * 210] bytes."""
    gen = np.random.default_rng(seed)
    blocks = gen.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 208:210] = np.frombuffer(np.float16(0.0005).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(hf_model: torch.nn.Module, path: Path, qtype: GGMLQuantizationType, vocab_tokens: bool = True,
               chat_template: str | None = None, arch: str | None = None) -> Path:
    """Write `hf_model` as a GGUF file whose 2-D weights are stored as `qtype` (`arch` overrides the
    architecture name the file declares)."""
    cfg = hf_model.config
    arch = arch or ARCH[type(hf_model).__name__]
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if vocab_tokens:
        tokens = _byte_tokens()
        assert len(tokens) == cfg.vocab_size, "the test vocabulary is the 256 byte tokens"
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(["a b"])
        w.add_bos_token_id(cfg.bos_token_id)
        w.add_eos_token_id(cfg.eos_token_id)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    seed = 0
    for name, tensor in hf_model.state_dict().items():
        if "rotary_emb" in name:
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            data = _permute(data, heads)
        target = gguf_name(name)
        if data.ndim == 1:
            w.add_tensor(target, data)
        elif qtype == GGMLQuantizationType.F32:
            w.add_tensor(target, data)
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(target, data.astype(np.float16))
        elif qtype == GGMLQuantizationType.Q6_K:
            seed += 1
            blocks = random_k_blocks(data.shape[0], data.shape[1], seed)
            w.add_tensor(target, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            blocks = quants.quantize(data, qtype)
            w.add_tensor(target, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
