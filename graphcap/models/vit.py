"""ViT image encoder compatible with HF `ViTModel` checkpoints, built from graphcap's tensor-parallel layers.

Patch embedding (a strided conv), a CLS token, learned absolute position embeddings, pre-LayerNorm blocks
and a final LayerNorm. Images must have the checkpoint's `image_size`: position embeddings are not
interpolated, which keeps every shape static for `torch.compile(dynamic=False)`. The pooler (dense + tanh
on CLS) is not built: `embed` does not use it, and many ViT checkpoints do not ship it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from graphcap.errors import UserError
from graphcap.models.bert import EncoderMLP, EncoderSelfAttention, load_encoder_weights, rename_layer_weight


@dataclass(frozen=True)
class ViTConfig:
    """The fields of an HF ViT `config.json` the encoder uses."""

    architecture: str
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    qkv_bias: bool

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict) -> "ViTConfig":
        try:
            config = cls(
                architecture=(hf.get("architectures") or ["ViTModel"])[0],
                image_size=int(hf.get("image_size", 224)),
                patch_size=int(hf.get("patch_size", 16)),
                num_channels=int(hf.get("num_channels", 3)),
                hidden_size=int(hf["hidden_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                hidden_act=str(hf.get("hidden_act", "gelu")),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                qkv_bias=bool(hf.get("qkv_bias", True)),
            )
        except KeyError as e:
            raise UserError(f"config.json is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"config.json has a malformed value: {e}") from None
        if config.image_size % config.patch_size:
            raise UserError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        if config.hidden_size % config.num_heads:
            raise UserError(f"hidden_size {config.hidden_size} is not divisible by {config.num_heads} heads")
        return config


class ViTLayer(nn.Module):
    """Pre-LayerNorm block: x = x + attn(LN(x)); x = x + mlp(LN(x))."""

    def __init__(self, cfg: ViTConfig, dtype: torch.dtype, quant_method_factory) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.attn = EncoderSelfAttention(cfg.hidden_size, cfg.num_heads, cfg.qkv_bias, dtype, quant_method_factory)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = EncoderMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, quant_method_factory)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.attn_norm(hidden), None)
        return hidden + self.mlp(self.mlp_norm(hidden))


class ViTEmbeddings(nn.Module):
    """Non-overlapping patches -> tokens, CLS prepended, position embeddings added (replicated on all ranks)."""

    def __init__(self, cfg: ViTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.patch_embeddings = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, dtype=dtype
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size, dtype=dtype), requires_grad=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"image is {tuple(pixel_values.shape[-2:])}, the checkpoint expects {self.image_size}x{self.image_size}"
            )
        patches = self.patch_embeddings(pixel_values.to(self.cls_token.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embeddings


_LAYER_RENAMES: tuple[tuple[re.Pattern[str], str, str | None], ...] = (
    (re.compile(r"^attention\.attention\.query\."), "attn.qkv_proj.", "q"),
    (re.compile(r"^attention\.attention\.key\."), "attn.qkv_proj.", "k"),
    (re.compile(r"^attention\.attention\.value\."), "attn.qkv_proj.", "v"),
    (re.compile(r"^attention\.output\.dense\."), "attn.o_proj.", None),
    (re.compile(r"^layernorm_before\."), "attn_norm.", None),
    (re.compile(r"^intermediate\.dense\."), "mlp.up_proj.", None),
    (re.compile(r"^output\.dense\."), "mlp.down_proj.", None),
    (re.compile(r"^layernorm_after\."), "mlp_norm.", None),
)


def rename_vit_weight(name: str) -> tuple[str, str | None]:
    """Map an HF ViT parameter name (optionally under the "vit." prefix of `ViTFor*`) to ours and its qkv shard."""
    if name.startswith("vit."):
        name = name[len("vit."):]
    name = name.replace("embeddings.patch_embeddings.projection.", "embeddings.patch_embeddings.")
    return rename_layer_weight(name, _LAYER_RENAMES)


class ViTModel(nn.Module):
    """Image encoder: `forward` returns the final-LayerNorm hidden states, `embed` the CLS vector."""

    config_class = ViTConfig

    def __init__(self, cfg: ViTConfig, dtype: torch.dtype = torch.float32, quant_method_factory=lambda: None) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg, dtype)
        self.layers = nn.ModuleList(ViTLayer(cfg, dtype, quant_method_factory) for _ in range(cfg.num_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + num_patches, hidden]; equals HF `ViTModel(...).last_hidden_state`."""
        hidden = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.layernorm(hidden)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLS token of the final LayerNorm output, [B, hidden], not normalised.

        This is the vector HF's `ViTForImageClassification` feeds its classifier and the usual image
        feature of ViT backbones; the optional tanh pooler is skipped because it is absent from many
        checkpoints and was only trained for some of them. Callers wanting cosine similarity normalise.
        """
        return self.forward(pixel_values)[:, 0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF ViT tensors; q/k/v go into the merged qkv shards, pooler and heads are skipped."""
        return load_encoder_weights(self, weights, rename_vit_weight)
