"""Paged attention in plain torch ops, for CPU and CUDA.

One function serves prefill (ragged, on top of a cached prefix), decode and mixed batches. Queries are
gathered into a padded [B, Lq] layout, keys into [B, L] via per-request slot indices, and a single
masked SDPA call does the rest. Because it is plain torch, the compiler can see through it when a graph
backend wants that; the opaque custom op in `op.py` wraps the very same function when it must not.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Padded attention work beyond this multiple of the ragged work makes per-request calls cheaper.
RAGGED_WASTE = 2.0


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' keys/values at their slots (padding tokens write to the reserved slot 0)."""
    k_cache[slot_mapping] = k
    v_cache[slot_mapping] = v


def kv_indices_from_block_table(block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """The cache slot of every key position of every request: [B, Np] pages -> [B, Np*page] slots."""
    offsets = torch.arange(page_size, device=block_table.device, dtype=block_table.dtype)
    return (block_table.unsqueeze(-1) * page_size + offsets).reshape(block_table.shape[0], -1)


def attention_mask(key_len: int, q_pos: torch.Tensor) -> torch.Tensor:
    """[B, 1, Lq, L] boolean: key position k is visible to a query at position p when k <= p."""
    key_pos = torch.arange(key_len, device=q_pos.device)
    return (key_pos.view(1, 1, key_len) <= q_pos.unsqueeze(-1)).unsqueeze(1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indices: torch.Tensor,
    q_index: torch.Tensor,
    q_pos: torch.Tensor,
    out_index: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ragged queries over their requests' cached keys.

    q: [T, H, D]; caches: [S, Hkv, D]; kv_indices: [B, L] cache slot of each key position;
    q_index: [B, Lq] token row of each padded query; q_pos: [B, Lq] absolute position of each query
    (a query at position p sees keys 0..p); out_index: [T] row of each token in the flat [B*Lq] output.
    `mask` is `attention_mask(L, q_pos)` when the caller built it once for all layers.
    """
    num_tokens, num_heads, head_dim = q.shape
    batch, max_q = q_index.shape
    num_kv_heads = k_cache.shape[1]
    key_len = kv_indices.shape[1]
    one_query_each = max_q == 1 and batch == num_tokens  # decode: token i is request i's only query
    if one_query_each:
        qp = q.unsqueeze(2)
    else:
        qp = q.index_select(0, q_index.reshape(-1)).view(batch, max_q, num_heads, head_dim).transpose(1, 2)
    flat_idx = kv_indices.reshape(-1)
    kp = k_cache.index_select(0, flat_idx).view(batch, key_len, num_kv_heads, head_dim).transpose(1, 2)
    vp = v_cache.index_select(0, flat_idx).view(batch, key_len, num_kv_heads, head_dim).transpose(1, 2)
    if mask is None:
        mask = attention_mask(key_len, q_pos)
    out = F.scaled_dot_product_attention(
        qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=num_kv_heads != num_heads
    )
    out = out.transpose(1, 2).reshape(batch * max_q, num_heads * head_dim)
    return out if one_query_each else out.index_select(0, out_index)


def prefix_free_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_index: torch.Tensor,
    out_index: torch.Tensor,
    scale: float,
    extend_lens: Sequence[int] = (),
) -> torch.Tensor:
    """Prefill where no request has cached keys: each request attends only over its own new tokens.

    The keys are the new k/v themselves (no cache read), and SDPA's causal mode replaces the mask:
    query j sees keys 0..j, exactly its request's keys so far. Requests of very different lengths
    (`extend_lens`, known out of graph) run one SDPA call per request on views of their rows, because
    padding them all to the longest would multiply the attention work; otherwise one padded call serves
    all, where the padding columns of a shorter request lie beyond all of its real queries. Shapes as in
    `paged_attention`; rows beyond the requests' tokens (bucket padding) carry no meaning.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    batch, max_q = q_index.shape
    gqa = num_kv_heads != num_heads

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2).reshape(-1, num_heads * head_dim)

    if batch * max_q == num_tokens and len(extend_lens) == batch and min(extend_lens) == max_q:
        # Equal lengths and no bucket padding: the token rows already are the padded [B, Lq] layout. (The
        # row count alone cannot tell: lengths 3 and 8 in a 16-row bucket also give 2 x 8 rows.)
        return attend(q.view(batch, max_q, num_heads, head_dim), k.view(batch, max_q, num_kv_heads, head_dim),
                      v.view(batch, max_q, num_kv_heads, head_dim))
    if len(extend_lens) == batch and batch * max_q * max_q > RAGGED_WASTE * sum(n * n for n in extend_lens):
        out = q.new_zeros(num_tokens, num_heads * head_dim)
        start = 0
        for n in extend_lens:
            rows = slice(start, start + n)
            out[rows] = attend(q[rows].unsqueeze(0), k[rows].unsqueeze(0), v[rows].unsqueeze(0))
            start += n
        return out
    rows = q_index.reshape(-1)
    out = attend(q.index_select(0, rows).view(batch, max_q, num_heads, head_dim),
                 k.index_select(0, rows).view(batch, max_q, num_kv_heads, head_dim),
                 v.index_select(0, rows).view(batch, max_q, num_kv_heads, head_dim))
    return out.index_select(0, out_index)


def write_and_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    q_index: torch.Tensor,
    q_pos: torch.Tensor,
    out_index: torch.Tensor,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """The whole attention step behind the opaque op: store the new keys/values, attend over the cache."""
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    kv_indices = kv_indices_from_block_table(block_table, page_size)
    return paged_attention(q, k_cache, v_cache, kv_indices, q_index, q_pos, out_index, scale)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indices: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per request, written as broadcast-multiply-reduce rather than SDPA.

    Under Inductor the cache gather fuses into the two reductions, so gathered K/V are never
    materialised and no per-call kernel setup is paid; that beats the SDPA kernel for decode on CPU.
    q: [B, H, D]; kv_indices: [B, L]; q_pos: [B, 1] -> [B, H*D].
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    keys = k_cache[kv_indices]  # [B, L, Hkv, D]
    values = v_cache[kv_indices]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation, float64 kept for references
    qg = q.view(batch, 1, num_kv_heads, group, head_dim).to(acc)
    scores = (qg * keys.unsqueeze(3).to(acc)).sum(-1) * scale  # [B, L, Hkv, G]
    key_pos = torch.arange(kv_indices.shape[1], device=q.device)
    visible = (key_pos.view(1, -1) <= q_pos.view(-1, 1)).view(batch, -1, 1, 1)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=1)
    out = (probs.unsqueeze(-1) * values.unsqueeze(3).to(acc)).sum(1)  # [B, Hkv, G, D]
    return out.to(q.dtype).reshape(batch, num_heads * head_dim)
