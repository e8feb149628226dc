"""The paged KV cache: fixed-size pages, a free list, and per-layer key/value storage.

Page 0 is reserved as the padding page: graph runners point padded tokens and padded requests at it, so
padding never touches a live request's cache.
"""

from __future__ import annotations

import torch

from graphcap.attention.op import register_kv_cache, unregister_kv_cache


def num_pages_for(kv_cache_tokens: int, page_size: int) -> int:
    """Pages for a token capacity, plus the reserved padding page."""
    return max(2, kv_cache_tokens // page_size + 1)


class PagePool:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages (one is reserved for padding)")
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) when not enough are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class KVCache:
    """Per-layer [slots, kv_heads, head_dim] tensors, registered so the attention op can find them."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.pool = PagePool(num_pages, page_size)
        slots = num_pages * page_size
        self.k = [torch.zeros(slots, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(slots, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.keys = [register_kv_cache(k, v) for k, v in zip(self.k, self.v)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def bind(self, attention_layers) -> None:
        for layer, k, v, key in zip(attention_layers, self.k, self.v, self.keys):
            layer.k_cache, layer.v_cache, layer.cache_key = k, v, key

    def release(self) -> None:
        for key in self.keys:
            unregister_kv_cache(key)
        self.k, self.v, self.keys = [], [], []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
