"""ForwardBatch: everything one model step needs, built by the model runner and read by graph runners."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from graphcap.attention.metadata import AttentionMetadata


class ForwardMode(enum.Enum):
    PREFILL = "prefill"  # new tokens of one or more requests, possibly on top of a cached prefix
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    select: torch.Tensor  # [B] token rows whose logits are wanted (last token of each request)
    prefix_lens: list[int]
    extend_lens: list[int]
    page_tables: list[list[int]]

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
