"""graphcap's C++ paged decode and prefill attention against independent per-request references, and the
engine's use of them (same tokens as the torch formulation, reported in stats, torch ops when the build
fails)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcap import LLM, SamplingParams
from graphcap.attention.metadata import build_metadata
from graphcap.ops import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"CPU kernels: {cpu_kernels.status()}")

PAGE = 4


def _reference(q, k_cache, v_cache, tables, positions, scale):
    """Request by request: softmax over keys 0..pos read from the cache slots, in float64."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    rows = []
    for b, (table, pos) in enumerate(zip(tables, positions)):
        slots = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(pos + 1)])
        keys = k_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        values = v_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), keys) * scale
        rows.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values).reshape(-1))
    return torch.stack(rows)


@settings(max_examples=40, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (4, 2), (8, 1), (6, 3)]),
    head_dim=st.sampled_from([4, 16, 17, 64]),
    positions=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    extra_pages=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(heads, head_dim, positions, extra_pages, dtype, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    cols = max(p // PAGE + 1 for p in positions) + extra_pages  # padded columns beyond every request's keys
    num_pages = len(positions) * cols + 1
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # pages scattered, page 0 reserved
    tables = [perm[i * cols:(i + 1) * cols] for i in range(len(positions))]
    k_cache = torch.randn(num_pages * PAGE, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages * PAGE, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(positions), num_heads, head_dim, generator=gen).to(dtype)
    block_table = torch.tensor(tables)
    kv_indices = (block_table.unsqueeze(-1) * PAGE + torch.arange(PAGE)).reshape(len(positions), -1)
    q_pos = torch.tensor(positions).view(-1, 1)
    scale = head_dim**-0.5
    got = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, kv_indices, q_pos, scale)
    want = _reference(q, k_cache, v_cache, tables, positions, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and got.shape == (len(positions), num_heads * head_dim)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def _prefill_reference(q, k, v, k_cache, v_cache, tables, prefix_lens, extend_lens, scale):
    """Token by token, in float64: the cache after this step's writes, and each new token's softmax over
    its request's keys at positions 0..its own."""
    k_cache, v_cache = k_cache.double().clone(), v_cache.double().clone()
    token = 0
    requests = []
    for table, prefix, extend in zip(tables, prefix_lens, extend_lens):
        slots = [table[p // PAGE] * PAGE + p % PAGE for p in range(prefix + extend)]
        for i in range(extend):
            k_cache[slots[prefix + i]] = k[token + i].double()
            v_cache[slots[prefix + i]] = v[token + i].double()
        requests.append((token, prefix, extend, slots))
        token += extend
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    rows = []
    for first, prefix, extend, slots in requests:
        for i in range(extend):
            seen = torch.tensor(slots[: prefix + i + 1])
            keys = k_cache[seen].repeat_interleave(heads // kv_heads, dim=1)
            values = v_cache[seen].repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.einsum("hd,lhd->hl", q[first + i].double(), keys) * scale
            rows.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values).reshape(-1))
    return torch.stack(rows), k_cache, v_cache


@settings(max_examples=40, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (4, 2), (8, 1), (6, 3), (40, 1)]),
    head_dim=st.sampled_from([4, 16, 17, 64]),
    requests=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 40)), min_size=1, max_size=5),
    padding_rows=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_prefill_kernel_matches_reference(heads, head_dim, requests, padding_rows, dtype, seed) -> None:
    """Ragged requests on cached prefixes, q/k/v as strided views of one qkv tensor (as models pass them),
    and bucket-padding rows after the real tokens, which write the reserved slot 0 and read request 0."""
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    prefix_lens, extend_lens = [p for p, _ in requests], [e for _, e in requests]
    pages = [-(-(p + e) // PAGE) for p, e in requests]
    perm = (torch.randperm(sum(pages), generator=gen) + 1).tolist()  # scattered pages, page 0 reserved
    tables = [perm[sum(pages[:i]):sum(pages[:i + 1])] for i in range(len(requests))]
    meta = build_metadata(tables, prefix_lens, extend_lens, PAGE, torch.device("cpu"))
    slots = (sum(pages) + 1) * PAGE
    k_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    tokens = sum(extend_lens)
    rows = tokens + padding_rows
    qkv = torch.randn(rows, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(rows, -1, head_dim) for t in (q, k, v))
    pad = torch.zeros(padding_rows, dtype=torch.int64)
    slot_mapping, out_index = torch.cat([meta.slot_mapping, pad]), torch.cat([meta.out_index, pad])
    scale = head_dim**-0.5
    want, want_k, want_v = _prefill_reference(q, k, v, k_cache, v_cache, tables, prefix_lens, extend_lens, scale)
    got = cpu_kernels.paged_prefill_attention(q, k, v, k_cache, v_cache, slot_mapping, meta.kv_indices(),
                                              meta.q_pos, out_index, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and got.shape == (rows, num_heads * head_dim)
    torch.testing.assert_close(got[:tokens].double(), want, atol=tol, rtol=tol)
    written = torch.ones(slots, dtype=torch.bool)
    written[0] = False  # the padding rows' slot holds whichever padding row came last
    torch.testing.assert_close(k_cache[written].double(), want_k[written], atol=0, rtol=0)
    torch.testing.assert_close(v_cache[written].double(), want_v[written], atol=0, rtol=0)


def test_prefill_kernel_refuses_mismatched_inputs() -> None:
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    cache = torch.zeros(16, 1, 8)
    meta = build_metadata([[1]], [0], [4], PAGE, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="one k/v row, slot and output row per token"):
        cpu_kernels.paged_prefill_attention(q, k[:3], k, cache, cache.clone(), meta.slot_mapping, meta.kv_indices(),
                                            meta.q_pos, meta.out_index, 1.0)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        cpu_kernels.paged_prefill_attention(q, k, k, cache, cache.clone(), meta.slot_mapping.int(),
                                            meta.kv_indices(), meta.q_pos, meta.out_index, 1.0)


def test_engine_attends_with_the_kernels_and_matches_torch_ops() -> None:
    """Prefill (ragged, several requests at once) and decode through the kernels give torch's tokens."""
    prompts = [[1, 2, 3], [4] * 21, [5, 6, 7, 8, 9, 10, 11]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outs = {}
    for kernels in (True, False):
        with LLM("tiny", kv_cache_tokens=512, cpu_kernels=kernels, graph_decode="eager", graph_prefill="eager") as llm:
            outs[kernels] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
            assert llm.stats()["attention_kernel"] == ("cpp" if kernels else "torch")
    assert outs[True] == outs[False]


def test_a_failed_build_leaves_torch_ops_in_charge(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", [broken])
    monkeypatch.setattr(cpu_kernels, "default_cache_dir", lambda: tmp_path)
    assert cpu_kernels._build().startswith("unavailable:")


def test_the_opaque_op_uses_the_kernels_only_for_engines_that_chose_them() -> None:
    """Piecewise graphs reach attention through `graphcap::attention`; it follows the engine's choice per cache."""
    from graphcap.attention import op

    with LLM("tiny", kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as on, LLM("tiny", kv_cache_tokens=256, cpu_kernels=False, graph_decode="eager", graph_prefill="eager") as off:
        on_keys, off_keys = set(on.runner.kv_cache.keys), set(off.runner.kv_cache.keys)
        assert on_keys <= op._KERNEL_KEYS and not off_keys & op._KERNEL_KEYS
    assert not on_keys & op._KERNEL_KEYS  # released with the engine
