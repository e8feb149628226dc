"""graphcap's C++ paged decode attention against an independent per-request reference, and the engine's
use of it (same tokens as the torch formulation, reported in stats, torch ops when the build fails)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcap import LLM, SamplingParams
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


def test_engine_decodes_with_the_kernel_and_matches_torch_ops() -> None:
    prompts = [[1, 2, 3], [4] * 21, [5, 6, 7, 8, 9, 10, 11]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outs = {}
    for kernels in (True, False):
        with LLM("tiny", kv_cache_tokens=512, cpu_kernels=kernels) as llm:
            outs[kernels] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
            assert llm.stats()["decode_attention_kernel"] == ("cpp" if kernels else "torch")
    assert outs[True] == outs[False]


def test_a_failed_build_leaves_torch_ops_in_charge(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "default_cache_dir", lambda: tmp_path)
    assert cpu_kernels._build().startswith("unavailable:")


def test_the_opaque_op_decodes_with_the_kernel_only_for_engines_that_chose_it() -> None:
    """Piecewise graphs reach attention through `graphcap::attention`; it follows the engine's choice per cache."""
    from graphcap.attention import op

    with LLM("tiny", kv_cache_tokens=256) as on, LLM("tiny", kv_cache_tokens=256, cpu_kernels=False) as off:
        on_keys, off_keys = set(on.runner.kv_cache.keys), set(off.runner.kv_cache.keys)
        assert on_keys <= op._DECODE_KERNEL_KEYS and not off_keys & op._DECODE_KERNEL_KEYS
    assert not on_keys & op._DECODE_KERNEL_KEYS  # released with the engine
