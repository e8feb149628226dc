"""The torch-native attention backend: how a model layer's attention call becomes kernels.

By default attention runs through the `graphcap::attention` custom op (eager runs, and compiled graphs
that must split at attention). Metadata built with `inline=True` (whole-step compiled decode) inlines the
torch code instead, so the compiler can fuse the cache gather into the attention reductions. Either way
the numbers come from `torch_native.py`.
"""

from __future__ import annotations

import torch

from graphcap.attention.metadata import AttentionMetadata
from graphcap.attention.op import attention_op
from graphcap.attention.torch_native import decode_attention, paged_attention, write_kv


class TorchNativeAttnBackend:
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_key: int,
        scale: float,
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> [T, H*D]."""
        if not meta.inline:
            return attention_op(
                q, k, v, meta.slot_mapping, meta.block_table, meta.q_index, meta.q_pos, meta.out_index,
                cache_key, meta.page_size, scale,
            )
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.q_index.shape[1] == 1 and meta.q_index.shape[0] == q.shape[0]:
            return decode_attention(q, k_cache, v_cache, meta.kv_indices(), meta.q_pos, scale)
        return paged_attention(
            q, k_cache, v_cache, meta.kv_indices(), meta.q_index, meta.q_pos, meta.out_index, scale
        )
