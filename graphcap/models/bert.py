"""BERT-style text encoder (HF `BertModel` layout) built from graphcap's tensor-parallel layers.

Inputs are padded `[batch, seq]` tensors plus a 0/1 attention mask; attention is bidirectional and runs in
plain `F.scaled_dot_product_attention` with a boolean key mask. Nothing in the forward depends on tensor
values, so `torch.compile(dynamic=False)` traces one graph per (batch, seq) shape, which is what the encoder
graph runner buckets on. There is no KV cache: an encoder sees every token of a sequence in one step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from graphcap.errors import UserError
from graphcap.layers.embedding import VocabParallelEmbedding
from graphcap.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from graphcap.layers.weights import copy_weight

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The HF `hidden_act` function; shared by BERT and ViT, which name activations the same way."""
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise UserError(f"unsupported hidden_act {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return fn


@dataclass(frozen=True)
class BertConfig:
    """The fields of an HF BERT `config.json` the encoder uses."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int

    @classmethod
    def from_hf(cls, hf: dict) -> "BertConfig":
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise UserError(f"position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        try:
            config = cls(
                architecture=(hf.get("architectures") or ["BertModel"])[0],
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                hidden_act=str(hf.get("hidden_act", "gelu")),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
                type_vocab_size=int(hf.get("type_vocab_size", 2)),
            )
        except KeyError as e:
            raise UserError(f"config.json is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"config.json has a malformed value: {e}") from None
        if config.hidden_size % config.num_heads:
            raise UserError(f"hidden_size {config.hidden_size} is not divisible by {config.num_heads} heads")
        return config


class EncoderSelfAttention(nn.Module):
    """Bidirectional multi-head attention; heads are split across TP ranks, the output is all-reduced."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool, dtype: torch.dtype, quant_method_factory) -> None:
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(
            hidden_size, self.head_dim, num_heads, num_heads, bias, dtype, quant_method_factory()
        )
        self.num_heads = self.qkv_proj.num_heads
        self.o_proj = RowParallelLinear(hidden_size, hidden_size, True, dtype, quant_method_factory())

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """`hidden` is [B, S, H]; `key_mask` is a boolean [B, 1, 1, S] (True = attend) or None."""
        b, s, _ = hidden.shape
        q, k, v = (
            self.qkv_proj(hidden).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class EncoderMLP(nn.Module):
    """up (column-parallel) -> activation -> down (row-parallel, all-reduced)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, act: str, dtype: torch.dtype, quant_method_factory
    ) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, True, dtype, quant_method_factory())
        self.act = activation(act)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, True, dtype, quant_method_factory())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class BertLayer(nn.Module):
    """Post-LayerNorm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertConfig, dtype: torch.dtype, quant_method_factory) -> None:
        super().__init__()
        self.attn = EncoderSelfAttention(cfg.hidden_size, cfg.num_heads, True, dtype, quant_method_factory)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = EncoderMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, quant_method_factory)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.attn_norm(hidden + self.attn(hidden, key_mask))
        return self.mlp_norm(hidden + self.mlp(hidden))


class BertEmbeddings(nn.Module):
    """Word (vocab-parallel) + absolute position + token type embeddings, then LayerNorm.

    Position and token-type tables are small, so every rank keeps them whole.
    """

    def __init__(self, cfg: BertConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            hidden = hidden + self.token_type_embeddings.weight[0]
        else:
            hidden = hidden + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(hidden)


# HF parameter name (after the optional "bert." prefix) -> (our name, qkv shard id or None).
_LAYER_RENAMES: tuple[tuple[re.Pattern[str], str, str | None], ...] = (
    (re.compile(r"^attention\.self\.query\."), "attn.qkv_proj.", "q"),
    (re.compile(r"^attention\.self\.key\."), "attn.qkv_proj.", "k"),
    (re.compile(r"^attention\.self\.value\."), "attn.qkv_proj.", "v"),
    (re.compile(r"^attention\.output\.dense\."), "attn.o_proj.", None),
    (re.compile(r"^attention\.output\.LayerNorm\."), "attn_norm.", None),
    (re.compile(r"^intermediate\.dense\."), "mlp.up_proj.", None),
    (re.compile(r"^output\.dense\."), "mlp.down_proj.", None),
    (re.compile(r"^output\.LayerNorm\."), "mlp_norm.", None),
)
_LAYER_PREFIX = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")


def rename_bert_weight(name: str) -> tuple[str, str | None]:
    """Map an HF BERT parameter name to ours and its qkv shard. Handles the "bert." prefix of
    `BertFor*` checkpoints and the TF-era `gamma`/`beta` LayerNorm names."""
    if name.startswith("bert."):
        name = name[len("bert."):]
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    return rename_layer_weight(name, _LAYER_RENAMES)


def rename_layer_weight(
    name: str, renames: tuple[tuple[re.Pattern[str], str, str | None], ...]
) -> tuple[str, str | None]:
    """`encoder.layer.N.<rest>` -> `layers.N.<ours>` by the first matching rename, with its qkv shard;
    the per-layer mapping every HF encoder layout (BERT, ViT) shares. Other names pass through."""
    match = _LAYER_PREFIX.match(name)
    if match is None:
        return name, None
    index, rest = match.groups()
    for pattern, ours, shard in renames:
        if pattern.match(rest):
            return f"layers.{index}.{pattern.sub(ours, rest)}", shard
    return f"layers.{index}.{rest}", None


def load_encoder_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], rename: Callable[[str], tuple[str, str | None]]
) -> set[str]:
    """Copy renamed (name, tensor) pairs into `model`; names it does not own (heads, poolers, buffers such as
    `position_ids`) are skipped. Returns the parameter names that were filled, so the caller can report gaps;
    a merged qkv parameter counts as filled only once all three of its shards arrived."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    shards_seen: dict[str, set[str]] = {}
    for hf_name, tensor in weights:
        name, shard = rename(hf_name)
        param = params.get(name)
        if param is None:
            continue
        if shard is not None:
            shards_seen.setdefault(name, set()).add(shard)
        copy_weight(param, tensor, shard, hf_name)
        loaded.add(name)
    return loaded - {name for name, seen in shards_seen.items() if seen != {"q", "k", "v"}}


class BertModel(nn.Module):
    """Text encoder: `forward` returns the last hidden state, `embed` the pooled sentence embedding."""

    config_class = BertConfig

    def __init__(self, cfg: BertConfig, dtype: torch.dtype = torch.float32, quant_method_factory=lambda: None) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, dtype)
        self.layers = nn.ModuleList(BertLayer(cfg, dtype, quant_method_factory) for _ in range(cfg.num_layers))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, S] ids and 0/1 mask -> [B, S, H]. Rows that are all padding come out finite (attention over
        no keys yields zeros), so a runner may pad the batch with dummy rows."""
        key_mask = attention_mask.bool()[:, None, None, :]
        hidden = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            hidden = layer(hidden, key_mask)
        return hidden

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [B, H]: mean over unmasked tokens, then L2-normalised, as sentence-transformers'
        Pooling(mean) + Normalize modules do, so cosine similarity is a dot product."""
        hidden = self.forward(input_ids, attention_mask)
        return mean_pool_normalize(hidden, attention_mask)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF BERT tensors (with or without the "bert." prefix); q/k/v go into the merged qkv shards."""
        return load_encoder_weights(self, weights, rename_bert_weight)


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the sequence, in fp32 for a stable sum, then unit L2 norm."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.float() * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1).to(hidden.dtype)
