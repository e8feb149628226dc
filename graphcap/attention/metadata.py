"""Attention metadata: the tensors that tell paged attention where each token's keys live.

The protocol has three steps so graph runners can own static buffers:
1. out of graph (`build_metadata`): Python/CPU work from request page tables and lengths;
2. in graph (`AttentionMetadata.kv_indices`): cheap tensor math derived from the buffers, recomputed on
   every replay so it always follows the live block table;
3. capture/replay hooks (`StaticMetadataBuffers`): a runner captures on static buffers and copies each
   live batch's metadata into them before replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from graphcap.attention.torch_native import attention_mask, kv_indices_from_block_table


@dataclass
class AttentionMetadata:
    """Index tensors for one forward. Shapes: T tokens, B requests, Lq longest query run, Np pages."""

    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    block_table: torch.Tensor  # [B, Np] page ids per request, padded with the reserved page 0
    q_index: torch.Tensor  # [B, Lq] token row of each padded query slot
    q_pos: torch.Tensor  # [B, Lq] absolute position of each padded query slot
    out_index: torch.Tensor  # [T] row of each token in the flattened [B*Lq] attention output
    page_size: int
    inline: bool = False  # True: expose attention's torch ops to the compiler instead of the opaque op
    prefix_free: bool = False  # no request has cached keys (set out of graph, where it is known for free)
    extend_lens: tuple[int, ...] = ()  # new tokens per request, for eager attention's ragged path
    _eager_kv: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _eager_plan: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def kv_indices(self) -> torch.Tensor:
        """In-graph prepare: the cache slot of every key position of every request, [B, Np*page]."""
        return kv_indices_from_block_table(self.block_table, self.page_size)

    def eager_kv_indices(self) -> torch.Tensor:
        """`kv_indices()` for attention run eagerly: built at the first layer and reused by the rest,
        since every layer of one step reads the same key positions."""
        if self._eager_kv is None:
            self._eager_kv = self.kv_indices()
        return self._eager_kv

    def eager_plan(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_indices, mask) for eager attention, built once per step like `eager_kv_indices`."""
        if self._eager_plan is None:
            kv = self.eager_kv_indices()
            # Additive float mask: SDPA takes it as is, where a boolean one is converted on every call.
            visible = attention_mask(kv.shape[1], self.q_pos)
            mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
            self._eager_plan = (kv, mask)
        return self._eager_plan


def build_metadata(
    page_tables: Sequence[Sequence[int]],
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    page_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Out-of-graph prepare for a batch where request i adds `extend_lens[i]` tokens after
    `prefix_lens[i]` cached ones (decode is extend_len == 1)."""
    max_q = max(extend_lens)
    cols = max(-(-(p + e) // page_size) for p, e in zip(prefix_lens, extend_lens))
    # Plain lists, one tensor per field: this runs every step, and per-element tensor writes would cost
    # more than the decode step itself on a small model.
    block_rows: list[list[int]] = []
    slot_mapping: list[int] = []
    q_index: list[list[int]] = []
    q_pos: list[list[int]] = []
    out_index: list[int] = []
    token = 0
    for i, (table, prefix, extend) in enumerate(zip(page_tables, prefix_lens, extend_lens)):
        n_pages = -(-(prefix + extend) // page_size)
        block_rows.append(list(table[:n_pages]) + [0] * (cols - n_pages))
        positions = range(prefix, prefix + extend)
        slot_mapping.extend(table[pos // page_size] * page_size + pos % page_size for pos in positions)
        pad = max_q - extend
        q_index.append(list(range(token, token + extend)) + [0] * pad)
        q_pos.append(list(positions) + [0] * pad)
        out_index.extend(range(i * max_q, i * max_q + extend))
        token += extend

    def tensor(data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=device)

    return AttentionMetadata(
        slot_mapping=tensor(slot_mapping),
        block_table=tensor(block_rows),
        q_index=tensor(q_index),
        q_pos=tensor(q_pos),
        out_index=tensor(out_index),
        page_size=page_size,
        prefix_free=not any(prefix_lens),
        extend_lens=tuple(extend_lens),
    )


class StaticMetadataBuffers:
    """Capture/replay hooks for decode graphs: static metadata for up to `max_bs` requests.

    `args(bs, cols)` gives the tensors a graph is captured with (views of fixed storage); `load(meta)`
    copies a live batch into the same storage before replay. Rows beyond the live batch point at the
    reserved page 0, so padded requests read and write only the padding slot.
    """

    def __init__(self, max_bs: int, max_pages_cols: int, page_size: int, device: torch.device) -> None:
        self.page_size = page_size
        self.max_pages_cols = max_pages_cols
        self.slot_mapping = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(max_bs, max_pages_cols, dtype=torch.int64, device=device)
        self.q_pos = torch.zeros(max_bs, 1, dtype=torch.int64, device=device)

    def args(self, bs: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.slot_mapping[:bs], self.block_table[:bs, :cols], self.q_pos[:bs]

    def load(self, meta: AttentionMetadata, bs: int, cols: int) -> None:
        """Replay hook: copy the live decode batch's metadata in, padding the rest."""
        live = meta.slot_mapping.shape[0]
        live_cols = meta.block_table.shape[1]
        self.slot_mapping[:live].copy_(meta.slot_mapping)
        self.slot_mapping[live:bs].zero_()
        self.block_table[:bs, :cols].zero_()
        self.block_table[:live, :live_cols].copy_(meta.block_table)
        self.q_pos[:live].copy_(meta.q_pos)
        self.q_pos[live:bs].zero_()


def decode_metadata(
    slot_mapping: torch.Tensor, block_table: torch.Tensor, q_pos: torch.Tensor, page_size: int, inline: bool
) -> AttentionMetadata:
    """In-graph prepare for decode: one query per request, so the query/output maps are aranges."""
    bs = slot_mapping.shape[0]
    rows = torch.arange(bs, device=slot_mapping.device)
    return AttentionMetadata(slot_mapping, block_table, rows.view(bs, 1), q_pos, rows, page_size, inline)
