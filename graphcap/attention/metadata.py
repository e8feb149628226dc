"""Attention metadata: the tensors that tell paged attention where each token's keys live.

The protocol has three steps so graph runners can own static buffers:
1. out of graph (`build_metadata`): Python/CPU work from request page tables and lengths;
2. in graph (`AttentionMetadata.kv_indices`): cheap tensor math derived from the buffers, recomputed on
   every replay so it always follows the live block table;
3. capture/replay hooks (`StaticMetadataBuffers`): a runner captures on static buffers and copies each
   live batch's metadata into them before replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from graphcap.attention.torch_native import kv_indices_from_block_table


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

    def kv_indices(self) -> torch.Tensor:
        """In-graph prepare: the cache slot of every key position of every request, [B, Np*page]."""
        return kv_indices_from_block_table(self.block_table, self.page_size)


def build_metadata(
    page_tables: Sequence[Sequence[int]],
    prefix_lens: Sequence[int],
    extend_lens: Sequence[int],
    page_size: int,
    device: torch.device,
    num_pages_cols: int | None = None,
) -> AttentionMetadata:
    """Out-of-graph prepare for a batch where request i adds `extend_lens[i]` tokens after
    `prefix_lens[i]` cached ones (decode is extend_len == 1)."""
    batch = len(extend_lens)
    max_q = max(extend_lens)
    total_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    need_pages = max((n + page_size - 1) // page_size for n in total_lens)
    cols = need_pages if num_pages_cols is None else num_pages_cols
    block_table = torch.zeros(batch, cols, dtype=torch.int64)
    slot_mapping: list[int] = []
    q_index = torch.zeros(batch, max_q, dtype=torch.int64)
    q_pos = torch.zeros(batch, max_q, dtype=torch.int64)
    out_index: list[int] = []
    token = 0
    for i, (table, prefix, extend) in enumerate(zip(page_tables, prefix_lens, extend_lens)):
        n_pages = (prefix + extend + page_size - 1) // page_size
        block_table[i, :n_pages] = torch.tensor(table[:n_pages], dtype=torch.int64)
        for j in range(extend):
            pos = prefix + j
            slot_mapping.append(table[pos // page_size] * page_size + pos % page_size)
            q_index[i, j] = token + j
            q_pos[i, j] = pos
            out_index.append(i * max_q + j)
        token += extend
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        block_table=block_table.to(device),
        q_index=q_index.to(device),
        q_pos=q_pos.to(device),
        out_index=torch.tensor(out_index, dtype=torch.int64, device=device),
        page_size=page_size,
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
