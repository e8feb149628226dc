"""Llama-family decoder (Llama, Qwen2 with qkv bias, Qwen3 with q/k RMSNorm).

The forward is split into `embed`, `body` (the layer stack, the part prefill graphs capture) and
`compute_logits`, so graph runners can capture exactly the piece they own while the rest runs eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

from graphcap.attention.backend import TorchNativeAttnBackend
from graphcap.attention.metadata import AttentionMetadata
from graphcap.distributed.parallel_state import get_tp_size
from graphcap.layers.activation import SiluAndMul
from graphcap.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from graphcap.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from graphcap.layers.norm import RMSNorm
from graphcap.layers.rotary import RotaryEmbedding
from graphcap.layers.weights import copy_weight
from graphcap.models.config import ModelConfig
from graphcap.models.segments import SegmentedBody, run_segmented


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant_method_factory) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias, dtype,
            quant_method_factory(),
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_proj_bias, dtype, quant_method_factory()
        )
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.attn_backend: TorchNativeAttnBackend | None = None
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.cache_key = -1

    def project(self, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything before attention proper: q/k/v projection, optional q/k norm, rotary."""
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The eager-break point of breakable and piecewise graphs: it alone reads per-request metadata."""
        return self.attn_backend.forward(q, k, v, meta, self.k_cache, self.v_cache, self.cache_key, self.scale)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant_method_factory) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, cfg.mlp_bias, dtype, quant_method_factory()
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype, quant_method_factory()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant_method_factory) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, dtype, quant_method_factory)
        self.mlp = MLP(cfg, dtype, quant_method_factory)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def pre_attention(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        q, k, v = self.self_attn.project(positions, hidden)
        return q, k, v, residual

    def post_attention(self, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.self_attn.o_proj(attn_out)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def first_segment(layer: DecoderLayer, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Body start up to the first attention."""
    return layer.pre_attention(positions, hidden, None)


def middle_segment(
    layer: DecoderLayer, next_layer: DecoderLayer, positions: torch.Tensor, attn_out: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """From one layer's attention output to the next layer's attention inputs."""
    hidden, residual = layer.post_attention(attn_out, residual)
    return next_layer.pre_attention(positions, hidden, residual)


def last_segment(layer: DecoderLayer, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """From the last attention output to the final pre-norm hidden state (residual folded in)."""
    hidden, residual = layer.post_attention(attn_out, residual)
    return hidden + residual


def attend(layer: DecoderLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    return layer.self_attn.attend(q, k, v, meta)


class LlamaForCausalLM(nn.Module):
    """Also serves Qwen2ForCausalLM and Qwen3ForCausalLM: their differences live in ModelConfig."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant_method_factory=lambda: None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, quant_method_factory) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.tp_size = get_tp_size()
        # RMSNorm builds fp32 weights; in the model dtype (as HF keeps them) the norm's output stays in
        # that dtype, so bf16/fp16 linears are not handed fp32 activations.
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.requires_grad_(False)
                module.weight.data = module.weight.data.to(dtype)

    # -- the three stages graph runners compose -------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def segmented_body(self) -> SegmentedBody:
        """The explicit body interface prefill graphs capture: the layer stack as segments between
        attention calls. `body` runs exactly these functions, so eager and graphs share one code path."""
        return SegmentedBody(list(self.layers), first_segment, middle_segment, last_segment, attend)

    def body(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The layer stack; returns the final pre-norm hidden state (residual folded in)."""
        return run_segmented(self.segmented_body(), hidden, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return self.lm_head.compute_logits(hidden)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of the tokens in `select` (all tokens when None)."""
        hidden = self.body(self.embed(input_ids), positions, meta)
        if select is not None:
            hidden = hidden.index_select(0, select)
        return self.compute_logits(hidden)

    # -- binding the runtime ------------------------------------------------------------------------
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.layers]

    def load_weights(self, weights) -> set[str]:
        """Load (name, tensor) pairs in HF naming; returns the parameter names that were completely filled.

        A stacked parameter (qkv_proj, gate_up_proj) counts as loaded only once every part arrived, so a
        checkpoint missing k_proj is reported as missing rather than served with zeros. A tensor the model
        has no place for is an error: silently dropping it (an o_proj bias, an extra layer) gives wrong output.
        """
        stacked = {
            "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
        }
        parts_of = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        got_parts: dict[str, set] = {}
        unexpected: list[str] = []
        for hf_name, tensor in weights:
            name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
            if "rotary_emb" in name:
                continue
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue
            shard = None
            for hf_part, (ours, shard_id) in stacked.items():
                if f".{hf_part}." in name:
                    name, shard = name.replace(hf_part, ours), shard_id
                    break
            param = params.get(name)
            if param is None:
                unexpected.append(hf_name)
                continue
            copy_weight(param, tensor, shard, name)
            if shard is None:
                loaded.add(name)
            else:
                got = got_parts.setdefault(name, set())
                got.add(shard)
                if got >= parts_of[name.split(".")[-2]]:
                    loaded.add(name)
        if unexpected:
            shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            raise ValueError(f"{len(unexpected)} checkpoint tensors have no place in the model: {shown}")
        return loaded
