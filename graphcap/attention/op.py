"""The opaque attention custom op, so compilers trace around attention and can split graphs at it.

The op takes no cache tensors: it looks the layer's cache up by key (as vLLM does with layer names), so
the compiler never sees a mutation of the multi-gigabyte cache and never copies it to functionalise one.
"""

from __future__ import annotations

import torch

from graphcap.attention.torch_native import kv_indices_from_block_table, write_and_attend, write_kv
from graphcap.ops import cpu_kernels

_KV_CACHES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_KERNEL_KEYS: set[int] = set()  # caches whose engine attends with graphcap's C++ kernels
_next_key = 0


def register_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Make one layer's cache reachable from the op; returns the key the layer passes to it."""
    global _next_key
    _next_key += 1
    _KV_CACHES[_next_key] = (k_cache, v_cache)
    return _next_key


def unregister_kv_cache(key: int) -> None:
    _KV_CACHES.pop(key, None)
    _KERNEL_KEYS.discard(key)


def use_cpu_kernels(key: int) -> None:
    """Attention through the op on this cache uses the C++ kernels (the engine built them and chose them)."""
    _KERNEL_KEYS.add(key)


@torch.library.custom_op("graphcap::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    q_index: torch.Tensor,
    q_pos: torch.Tensor,
    out_index: torch.Tensor,
    cache_key: int,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    k_cache, v_cache = _KV_CACHES[cache_key]
    decode = q_index.shape[1] == 1 and q_index.shape[0] == q.shape[0]
    if cache_key in _KERNEL_KEYS and (decode or cpu_kernels.prefill_kernel_fits(block_table, page_size)):
        kv_indices = kv_indices_from_block_table(block_table, page_size)
        if decode:
            write_kv(k, v, k_cache, v_cache, slot_mapping)
            return cpu_kernels.paged_decode_attention(q, k_cache, v_cache, kv_indices, q_pos, scale)
        return cpu_kernels.paged_prefill_attention(q, k, v, k_cache, v_cache, slot_mapping, kv_indices, q_pos,
                                                   out_index, scale)
    return write_and_attend(q, k, v, k_cache, v_cache, slot_mapping, block_table, q_index, q_pos, out_index,
                            page_size, scale)


@attention_op.register_fake
def _attention_fake(q, k, v, slot_mapping, block_table, q_index, q_pos, out_index, cache_key, page_size, scale):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
