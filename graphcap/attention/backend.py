"""The torch-native attention backend: how a model layer's attention call becomes kernels.

By default attention is opaque to compilers: under a trace it is the `graphcap::attention` custom op
(so compiled graphs can split at it), in eager it is the op's implementation called directly. Metadata
built with `inline=True` (whole-step compiled decode) inlines the attention instead: the torch code, which
the compiler fuses with the cache gather, or, with `cpu_kernels`, graphcap's C++ paged decode kernel
(`graphcap.ops.cpu_kernels`), which reads only each request's real keys; eager decode steps use that kernel
too. Measured on tiny (docs/benchmarks.md): the kernel beats eager's gather + SDPA at every batch size and
the compiled torch code from batch 4 up (21% at 16), but loses about 4% of the compiled step at batch 1,
where the fused torch code needs no call out of the generated kernel. The numbers are the same either way.

With `cpu_kernels`, other attention run outside a trace (eager prefill, and the eager breaks of breakable
and piecewise prefill graphs) over contexts of up to `PREFILL_MAX_KEYS` keys is one call of the C++
prefill kernel, which writes the new keys and values and attends over each request's own keys in one
pass, where the torch path pays two index writes, SDPA's set-up and, for ragged batches, one SDPA call
per request.
"""

from __future__ import annotations

import torch

from graphcap.attention.metadata import AttentionMetadata
from graphcap.attention.op import attention_op
from graphcap.attention.torch_native import decode_attention, paged_attention, prefix_free_attention, write_kv
from graphcap.ops import cpu_kernels


class TorchNativeAttnBackend:
    def __init__(self, use_kernels: bool = False) -> None:
        self.use_kernels = use_kernels  # only where cpu_kernels.available(): decided once, at build time

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
        if not meta.inline and torch.compiler.is_compiling():
            return attention_op(q, k, v, meta.slot_mapping, meta.block_table, meta.q_index, meta.q_pos,
                                meta.out_index, cache_key, meta.page_size, scale)
        one_query_each = meta.q_index.shape[1] == 1 and meta.q_index.shape[0] == q.shape[0]
        if (self.use_kernels and not one_query_each and not meta.inline
                and cpu_kernels.prefill_kernel_fits(meta.block_table, meta.page_size)):
            return cpu_kernels.paged_prefill_attention(q, k, v, k_cache, v_cache, meta.slot_mapping,
                                                       meta.eager_kv_indices(), meta.q_pos, meta.out_index, scale)
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if one_query_each and self.use_kernels:
            kv_indices = meta.kv_indices() if meta.inline else meta.eager_kv_indices()
            return cpu_kernels.paged_decode_attention(q, k_cache, v_cache, kv_indices, meta.q_pos, scale)
        if meta.inline:
            if one_query_each:
                return decode_attention(q, k_cache, v_cache, meta.kv_indices(), meta.q_pos, scale)
            return paged_attention(
                q, k_cache, v_cache, meta.kv_indices(), meta.q_index, meta.q_pos, meta.out_index, scale
            )
        # Outside a trace the op boundary buys nothing and its dispatch costs tens of microseconds per
        # layer, so eager steps (and CUDA graph captures of them) run its implementation directly, with
        # the key indices and mask built once per step instead of once per layer.
        if meta.prefix_free:
            return prefix_free_attention(q, k, v, meta.q_index, meta.out_index, scale, meta.extend_lens)
        kv_indices, mask = meta.eager_plan(q.dtype)
        return paged_attention(q, k_cache, v_cache, kv_indices, meta.q_index, meta.q_pos, meta.out_index,
                               scale, mask)
