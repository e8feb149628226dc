"""Fresh random batches for capture-time verification and timing.

Probes take real pages from the pool and fill them with random keys/values, so a graph is checked on
attention over non-trivial cache contents, with random lengths and page layouts; `release` gives the
pages back zeroed. Capture happens before any request is admitted, so probes never touch live data.
"""

from __future__ import annotations

import os

import torch

from graphcap.batch.forward_batch import ForwardBatch, ForwardMode


def rss_bytes() -> int:
    """Resident set size of this process (Linux), for the memory graphs add on CPU."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class ProbeBatches:
    """Probe requests never exceed what the engine could be given: no request longer than `max_len`
    positions (a compiled graph indexing the rotary table past the model's length aborts the process), and
    never more cache than the pool holds."""

    def __init__(self, model_runner, seed: int, max_len: int | None = None) -> None:
        self.mr = model_runner
        self.gen = torch.Generator().manual_seed(seed)
        self.taken: list[int] = []
        self.max_len = max_len or model_runner.config.max_position_embeddings

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.gen).item())

    def _pages(self, num_tokens: int) -> list[int]:
        pool = self.mr.pool
        pages = pool.alloc(pool.pages_for(num_tokens))
        if pages is None:
            raise RuntimeError("KV cache too small to probe graphs at capture; raise kv_cache_tokens")
        self.taken.extend(pages)
        self._fill(pages, random=True)
        return pages

    def _fill(self, pages: list[int], random: bool) -> None:
        size = self.mr.page_size
        slots = (torch.tensor(pages).unsqueeze(-1) * size + torch.arange(size)).reshape(-1).to(self.mr.device)
        for cache in self.mr.kv_cache.k + self.mr.kv_cache.v:
            if random:
                noise = torch.randn((slots.numel(), *cache.shape[1:]), generator=self.gen).to(cache)
                cache.index_copy_(0, slots, noise)
            else:
                cache.index_fill_(0, slots, 0)

    def decode(self, batch_size: int, max_context: int) -> ForwardBatch:
        """A decode batch of requests with random context lengths in [1, max_context] (fewer where the
        model's length or the free cache demands)."""
        vocab = self.mr.config.vocab_size
        per_request = self.mr.pool.free_pages // max(1, batch_size) * self.mr.page_size
        max_context = max(1, min(max_context, self.max_len - 1, per_request - 1))
        prefix = [self._randint(1, max(1, max_context - 1)) for _ in range(batch_size)]
        tables = [self._pages(p + 1) for p in prefix]
        tokens = [[self._randint(0, vocab - 1)] for _ in range(batch_size)]
        return self.mr.make_batch(ForwardMode.DECODE, tokens, prefix, tables)

    def prefill(self, extend_lens: list[int], prefix_lens: list[int]) -> ForwardBatch:
        """A prefill batch of requests adding `extend_lens` tokens on top of `prefix_lens` cached ones; a
        request longer than the model allows is split into several (same token count)."""
        vocab = self.mr.config.vocab_size
        extend_lens, prefix_lens = self._within_cache(*self._within_length(extend_lens, prefix_lens))
        tables = [self._pages(p + e) for p, e in zip(prefix_lens, extend_lens)]
        tokens = [[self._randint(0, vocab - 1) for _ in range(e)] for e in extend_lens]
        return self.mr.make_batch(ForwardMode.PREFILL, tokens, prefix_lens, tables)

    def _within_cache(self, extend_lens: list[int], prefix_lens: list[int]) -> tuple[list[int], list[int]]:
        """The same token count in a shape the free pages hold: without cached prefixes, and if page rounding
        over many requests still does not fit, as few requests as the model's length allows."""
        pool = self.mr.pool

        def pages(extends, prefixes):
            return sum(pool.pages_for(e + p) for e, p in zip(extends, prefixes))

        if pages(extend_lens, prefix_lens) <= pool.free_pages:
            return extend_lens, prefix_lens
        prefix_lens = [0] * len(extend_lens)
        if pages(extend_lens, prefix_lens) <= pool.free_pages:
            return extend_lens, prefix_lens
        return self._within_length([sum(extend_lens)], [0])

    def _within_length(self, extend_lens: list[int], prefix_lens: list[int]) -> tuple[list[int], list[int]]:
        extends, prefixes = [], []
        for extend, prefix in zip(extend_lens, prefix_lens):
            prefix = min(prefix, self.max_len // 2)
            while extend > 0:
                take = min(extend, self.max_len - prefix)
                extends.append(take)
                prefixes.append(prefix)
                extend, prefix = extend - take, 0
        return extends, prefixes

    def release(self) -> None:
        if self.taken:
            self._fill(self.taken, random=False)
            self.mr.pool.free(self.taken)
        self.taken = []
