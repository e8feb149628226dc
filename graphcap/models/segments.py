"""The explicit interface through which a model declares its body (the layer stack) to graph runners.

A body is `first`, then for each layer an eager `attend` break followed by `middle` (or `last` after the
final layer). Runners capture the segments and run the breaks with live per-request metadata; a model
without this interface is refused by the prefill runner rather than guessed at from attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from graphcap.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class SegmentedBody:
    layers: Sequence[nn.Module]
    first: Callable[..., tuple[torch.Tensor, ...]]  # (layer0, positions, hidden) -> (q, k, v, residual)
    middle: Callable[..., tuple[torch.Tensor, ...]]  # (layer, next, positions, attn_out, residual) -> (q, k, v, residual)
    last: Callable[..., torch.Tensor]  # (layer, attn_out, residual) -> hidden
    attend: Callable[..., torch.Tensor]  # (layer, q, k, v, meta) -> attn_out


def run_segmented(body: SegmentedBody, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    layers = body.layers
    q, k, v, residual = body.first(layers[0], positions, hidden)
    for i, layer in enumerate(layers):
        attn_out = body.attend(layer, q, k, v, meta)
        if i + 1 == len(layers):
            return body.last(layer, attn_out, residual)
        q, k, v, residual = body.middle(layer, layers[i + 1], positions, attn_out, residual)
    raise ValueError("a segmented body needs at least one layer")
