"""Rotary position embeddings (HF "rotate half" layout), including llama3 frequency scaling."""

from __future__ import annotations

import functools
import json
import math

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["factor"]
    low = params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old_ctx = params["original_max_position_embeddings"]
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@functools.lru_cache(maxsize=8)
def _cos_sin_cache(head_dim: int, max_positions: int, theta: float, scaling_json: str, device: torch.device):
    """One table per model, not per layer: every layer's is identical (a 30-layer model with 8192
    positions would otherwise build and hold 30 copies)."""
    scaling = json.loads(scaling_json)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type not in ("default", None):
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    # cos and sin side by side, so one gather per layer fetches both.
    return torch.cat((emb.cos(), emb.sin()), dim=-1).to(device)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        device = torch.get_default_device()
        cache = _cos_sin_cache(head_dim, max_positions, theta, json.dumps(scaling, sort_keys=True), device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D], positions: [T]. q and k are rotated together: one pass of the
        rotate-half arithmetic instead of two (decode is overhead-bound, op count is the cost)."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        num_q = q.shape[1]
        out = _apply(torch.cat((q, k), dim=1), cos, sin)
        return out[:, :num_q], out[:, num_q:]


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    if x.dtype in (torch.float32, torch.float64):  # float64: the verification reference stays exact
        return x * cos + rotated * sin
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
