"""Each attention path against a naive per-request reference (explicit causal softmax over the cache).

The paths differ in how they reach the keys (cache gather, the new tokens themselves, one padded call or
one call per request), so the reference is written independently of all of them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcap.attention.metadata import build_metadata
from graphcap.attention.torch_native import (
    attention_mask,
    decode_attention,
    kv_indices_from_block_table,
    paged_attention,
    prefix_free_attention,
    write_kv,
)

PAGE = 4
HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = DIM**-0.5


def _reference(q, k_cache, v_cache, tables, prefixes, extends):
    """Request by request, token by token: softmax over keys 0..pos read from the cache slots."""
    rows, token = [], 0
    for table, prefix, extend in zip(tables, prefixes, extends):
        for j in range(extend):
            pos = prefix + j
            slots = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(pos + 1)])
            keys = k_cache[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)  # [L, H, D]
            values = v_cache[slots].repeat_interleave(HEADS // KV_HEADS, dim=1)
            scores = torch.einsum("hd,lhd->hl", q[token], keys) * SCALE
            rows.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values).reshape(-1))
            token += 1
    return torch.stack(rows)


def _batch(seed: int, prefixes: list[int], extends: list[int]):
    gen = torch.Generator().manual_seed(seed)
    pages_needed = [-(-(p + e) // PAGE) for p, e in zip(prefixes, extends)]
    perm = (torch.randperm(sum(pages_needed) + 3, generator=gen) + 1).tolist()  # page 0 is padding
    tables, start = [], 0
    for n in pages_needed:
        tables.append(perm[start:start + n])
        start += n
    slots = (max(perm) + 1) * PAGE
    k_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen)
    v_cache = torch.randn(slots, KV_HEADS, DIM, generator=gen)
    tokens = sum(extends)
    q = torch.randn(tokens, HEADS, DIM, generator=gen)
    k = torch.randn(tokens, KV_HEADS, DIM, generator=gen)
    v = torch.randn(tokens, KV_HEADS, DIM, generator=gen)
    meta = build_metadata(tables, prefixes, extends, PAGE, torch.device("cpu"))
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return q, k, v, k_cache, v_cache, tables, meta


lengths = st.lists(st.integers(1, 20), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None)
@given(extends=lengths, data=st.data(), seed=st.integers(0, 2**16))
def test_paged_attention_matches_reference(extends, data, seed) -> None:
    prefixes = data.draw(st.lists(st.integers(0, 12), min_size=len(extends), max_size=len(extends)))
    q, _, _, k_cache, v_cache, tables, meta = _batch(seed, prefixes, extends)
    ref = _reference(q, k_cache, v_cache, tables, prefixes, extends)
    kv = kv_indices_from_block_table(meta.block_table, PAGE)
    for mask in (None, attention_mask(kv.shape[1], meta.q_pos)):
        out = paged_attention(q, k_cache, v_cache, kv, meta.q_index, meta.q_pos, meta.out_index, SCALE, mask)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(extends=lengths, seed=st.integers(0, 2**16))
def test_prefix_free_attention_matches_reference_on_every_path(extends, seed) -> None:
    prefixes = [0] * len(extends)
    q, k, v, k_cache, v_cache, tables, meta = _batch(seed, prefixes, extends)
    assert meta.prefix_free
    ref = _reference(q, k_cache, v_cache, tables, prefixes, extends)
    padded = prefix_free_attention(q, k, v, meta.q_index, meta.out_index, SCALE)  # one padded call
    per_request = prefix_free_attention(q, k, v, meta.q_index, meta.out_index, SCALE,
                                        extend_lens=meta.extend_lens)  # ragged loop where it pays
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_request, ref, atol=1e-5, rtol=1e-5)


def test_ragged_path_is_taken_for_uneven_lengths_and_leaves_padding_rows_zero() -> None:
    extends = [1, 2, 16]  # padded work 3*16*16 >> 1 + 4 + 256
    q, k, v, k_cache, v_cache, tables, meta = _batch(0, [0, 0, 0], extends)
    ref = _reference(q, k_cache, v_cache, tables, [0, 0, 0], extends)
    pad = 5  # a bucket larger than the batch: extra token rows the runner zero-fills
    qp, kp, vp = (torch.cat([t, torch.zeros(pad, *t.shape[1:])]) for t in (q, k, v))
    out_index = torch.cat([meta.out_index, torch.zeros(pad, dtype=torch.int64)])
    out = prefix_free_attention(qp, kp, vp, meta.q_index, out_index, SCALE, extend_lens=meta.extend_lens)
    torch.testing.assert_close(out[:19], ref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(out[19:]) == 0


@pytest.mark.parametrize("extends", [[8, 8, 8], [5], [3, 3]])
def test_equal_lengths_attend_on_views_of_the_token_rows(extends) -> None:
    q, k, v, k_cache, v_cache, tables, meta = _batch(2, [0] * len(extends), extends)
    ref = _reference(q, k_cache, v_cache, tables, [0] * len(extends), extends)
    out = prefix_free_attention(q, k, v, meta.q_index, meta.out_index, SCALE, extend_lens=meta.extend_lens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_uneven_requests_whose_padded_rows_happen_to_fill_a_rectangle_are_not_taken_for_equal() -> None:
    """Lengths 3 and 8 padded to a 16-row bucket: 2 x 8 rows, as if two requests of 8."""
    extends = [3, 8]
    q, k, v, k_cache, v_cache, tables, meta = _batch(4, [0, 0], extends)
    ref = _reference(q, k_cache, v_cache, tables, [0, 0], extends)
    pad = 5
    qp, kp, vp = (torch.cat([t, torch.zeros(pad, *t.shape[1:])]) for t in (q, k, v))
    out_index = torch.cat([meta.out_index, torch.zeros(pad, dtype=torch.int64)])
    out = prefix_free_attention(qp, kp, vp, meta.q_index, out_index, SCALE, extend_lens=meta.extend_lens)
    torch.testing.assert_close(out[:11], ref, atol=1e-5, rtol=1e-5)


def test_single_request_filling_every_row_matches_reference() -> None:
    q, k, v, k_cache, v_cache, tables, meta = _batch(1, [0], [12])
    out = prefix_free_attention(q, k, v, meta.q_index, meta.out_index, SCALE)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, tables, [0], [12]), atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(prefixes=st.lists(st.integers(0, 30), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_decode_attention_matches_reference(prefixes, seed) -> None:
    extends = [1] * len(prefixes)
    q, _, _, k_cache, v_cache, tables, meta = _batch(seed, prefixes, extends)
    kv = kv_indices_from_block_table(meta.block_table, PAGE)
    out = decode_attention(q, k_cache, v_cache, kv, meta.q_pos, SCALE)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, tables, prefixes, extends), atol=1e-5, rtol=1e-5)
