"""GGUF block kernels (graphcap/ops/gguf_kernels.py, csrc/gguf_linear.cpp) against the gguf package and a
float64 reference, with error bounds derived from the arithmetic rather than tuned tolerances.

The integer kernel's error. x_k is replaced by d_x p_k with p_k = round(x_k / d_x), d_x = max|x| / 127 over
the 32-wide block b, so |x_k - d_x p_k| <= amax_b / 254 (times 1 + 2^-10 for the float32 rounding of d_x and
1 / d_x, each a few units in 2^-24 of amax_b). The kernel then computes sum_k w_k d_x p_k exactly in integers
per block and in float32 across blocks, so against sum_k w_k x_k in float64:

    |err| <= sum_b (1 + 2^-10) amax_b / 254 * sum_{k in b} |w_k|  +  gamma(nb + 8) * sum_b T_b

where gamma(n) = n u / (1 - n u), u = 2^-24, bounds float32 rounding over a sum of nb + 8 terms (nb block
steps, the horizontal sum, the scale products and the final add), and T_b bounds the magnitude of the
block's float terms: (c |d_w| + |m_w|) * sum_{k in b} |d_x p_k| with c the largest |integer weight| the kernel
multiplies (127 + 1 for Q8_0, 15 + 8 for Q4_0's q and -8 terms, 15 for Q4_1). (A block whose max|x| is
under 1.5e-36 is zeroed instead, as 127 / max|x| would overflow; its own test adds that to the bound.) The
float32 GEMM path and the torch fallback obey gamma(K + 2) * sum_k |x_k| (c |d_w| + |m_w|) (any summation
order, plus the weight's own expansion to float32).
"""

from __future__ import annotations

import hashlib
import platform

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcap.ops import cpu_kernels
from graphcap.ops import gguf_kernels as gk

U = 2.0**-24
MAX_INT_WEIGHT = {"Q8_0": 128, "Q4_0": 23, "Q4_1": 15}
INTEGER_ONLY = 2**62  # a GEMM threshold no call reaches: the integer kernel for every M
GEMM_ALWAYS = 0


def _gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _weight(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    """Blocks of very different magnitudes (1e-3..3e3: m and d stay within fp16), some all zero."""
    nb = k // gk.BLOCK
    magnitude = 10.0 ** (torch.rand(n, nb, 1, generator=gen) * 6.5 - 3)
    w = torch.randn(n, nb, gk.BLOCK, generator=gen) * magnitude
    w[torch.rand(n, nb, generator=gen) < 0.15] = 0.0
    return w.reshape(n, k)


def _activations(gen: torch.Generator, m: int, k: int) -> torch.Tensor:
    """Rows with zero blocks, wide-ranging block magnitudes and single outliers (as LLM activations have)."""
    nb = k // gk.BLOCK
    x = torch.randn(m, nb, gk.BLOCK, generator=gen) * 10.0 ** (torch.rand(m, nb, 1, generator=gen) * 6 - 3)
    x[torch.rand(m, nb, generator=gen) < 0.1] = 0.0
    x = x.reshape(m, k)
    outliers = torch.rand(m, k, generator=gen) < 0.01
    return torch.where(outliers, x * 100, x)


def _gguf_quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype]))


def _scales(blocks: torch.Tensor, qtype: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's |d| and |m| (0 for the types without m) in float64, [N, nb]."""
    raw = blocks.view(blocks.shape[0], k // gk.BLOCK, gk.BYTES_PER_BLOCK[qtype])
    halves = raw.view(torch.float16).double()
    d = halves[..., 0].abs()
    return d, halves[..., 1].abs() if qtype == "Q4_1" else torch.zeros_like(d)


def _integer_bound(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    m, k = x.shape
    nb = k // gk.BLOCK
    xb = x.double().reshape(m, nb, gk.BLOCK)
    amax = xb.abs().amax(-1)  # [M, nb]
    w_l1 = gk.dequantize(blocks, qtype, k).double().reshape(-1, nb, gk.BLOCK).abs().sum(-1)  # [N, nb]
    d, mins = _scales(blocks, qtype, k)
    x_hat_l1 = xb.abs().sum(-1) + gk.BLOCK * amax / 254
    quantisation = (amax / 254 * (1 + 2**-10)) @ w_l1.T
    rounding = _gamma(nb + 8) * (x_hat_l1 @ (MAX_INT_WEIGHT[qtype] * d + mins).T)
    return quantisation + rounding


def _float_bound(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    k = x.shape[1]
    d, mins = _scales(blocks, qtype, k)
    w_max = (MAX_INT_WEIGHT[qtype] * d + mins).repeat_interleave(gk.BLOCK, dim=1)  # >= |w_k|, [N, K]
    return _gamma(k + 2) * (x.double().abs() @ w_max.T)


def _reference(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    return x.double() @ gk.dequantize(blocks, qtype, x.shape[1]).double().T


def _assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - want).abs()
    worst = (err - bound).argmax()
    assert torch.all(err <= bound), f"error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"


def _kernel():
    """The C++ op; the kernel tests fail, not skip, without it (a machine with a compiler builds it)."""
    assert cpu_kernels.available(), f"the C++ kernels did not build: {cpu_kernels.status()}"
    return torch.ops.graphcap_cpu.gguf_linear


# -- formats --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", gk.SUPPORTED_TYPES)
def test_dequantize_and_quantize_match_gguf_bitwise(qtype: str) -> None:
    gen = torch.Generator().manual_seed(1)
    w = _weight(gen, 37, 256)
    w[3, 5] = 0.5 * w[3, 4]  # ties and repeated values inside blocks
    w[4, :32] = torch.linspace(-1, 1, 32)
    theirs = _gguf_quantize(w, qtype)
    ours = gk.quantize(w, qtype)
    assert ours.dtype == torch.uint8 and torch.equal(ours, theirs)
    want = gguf.quants.dequantize(theirs.numpy(), gguf.GGMLQuantizationType[qtype])
    got = gk.dequantize(theirs, qtype, 256)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", gk.SUPPORTED_TYPES)
def test_embedding_expands_only_the_selected_rows(qtype: str) -> None:
    gen = torch.Generator().manual_seed(2)
    blocks = gk.quantize(_weight(gen, 50, 64), qtype)
    ids = torch.tensor([[3, 0, 49], [3, 7, 7]])
    got = gk.gguf_embedding(ids, blocks, qtype, 64)
    assert got.shape == (2, 3, 64) and torch.equal(got, gk.dequantize(blocks, qtype, 64)[ids])


# -- the C++ kernel -------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    qtype=st.sampled_from(gk.SUPPORTED_TYPES),
    m=st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 100, 257])),
    n=st.sampled_from([1, 3, 7, 8, 9, 33, 100]),
    nb=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_kernel_within_derived_bounds(qtype: str, m: int, n: int, nb: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = nb * gk.BLOCK
    blocks = _gguf_quantize(_weight(gen, n, k), qtype)
    x = _activations(gen, m, k)
    want = _reference(x, blocks, qtype)
    integer_bound, float_bound = _integer_bound(x, blocks, qtype), _float_bound(x, blocks, qtype)
    op = _kernel()
    _assert_within(op(x, blocks, gk.TYPE_CODES[qtype], INTEGER_ONLY), want, integer_bound)
    _assert_within(op(x, blocks, gk.TYPE_CODES[qtype], GEMM_ALWAYS), want, float_bound)
    got = gk.gguf_linear(x, blocks, qtype, n)  # the public entry point, its own threshold
    assert got.shape == (m, n) and got.dtype == torch.float32
    _assert_within(got, want, float_bound if m >= gk.GEMM_MIN_ROWS else integer_bound)


@pytest.mark.parametrize("qtype", gk.SUPPORTED_TYPES)
def test_tiny_and_special_activation_blocks(qtype: str) -> None:
    """Blocks below float's range for 127 / max|x| are zeroed (error under 1.5e-36 per weight), not turned into
    overflowed int8 codes; zero blocks give exact zeros; NaN propagates as in float math."""
    gen = torch.Generator().manual_seed(7)
    blocks = _gguf_quantize(_weight(gen, 5, 96), qtype)
    x = _activations(gen, 4, 96)
    x[0, :32], x[1, 32:64], x[2] = 1e-38, 3e-45, 0.0
    got = _kernel()(x, blocks, gk.TYPE_CODES[qtype], INTEGER_ONLY)
    w_l1 = gk.dequantize(blocks, qtype, 96).double().abs().sum(-1)
    _assert_within(got, _reference(x, blocks, qtype), _integer_bound(x, blocks, qtype) + 1.5e-36 * w_l1)
    assert torch.all(got[2] == 0)
    x[3, 5] = float("nan")
    assert torch.all(torch.isnan(_kernel()(x, blocks, gk.TYPE_CODES[qtype], INTEGER_ONLY)[3]))


def test_gemm_path_expands_the_weight_in_chunks() -> None:
    """33000 rows of 32 weights are two of the float path's 4 MB chunks of expanded weight."""
    gen = torch.Generator().manual_seed(8)
    blocks = gk.quantize(torch.randn(33000, 32, generator=gen), "Q4_1")
    x = torch.randn(3, 32, generator=gen)
    got = _kernel()(x, blocks, gk.TYPE_CODES["Q4_1"], GEMM_ALWAYS)
    _assert_within(got, _reference(x, blocks, "Q4_1"), _float_bound(x, blocks, "Q4_1"))


def test_kernel_takes_batched_and_strided_inputs() -> None:
    _kernel()
    gen = torch.Generator().manual_seed(3)
    blocks = gk.quantize(_weight(gen, 10, 64), "Q4_1")
    x = _activations(gen, 6, 128)[:, ::2].reshape(2, 3, 64)  # non-contiguous, leading batch dims
    got = gk.gguf_linear(x, blocks, "Q4_1", 10)
    assert got.shape == (2, 3, 10)
    assert torch.equal(got, gk.gguf_linear(x.contiguous(), blocks, "Q4_1", 10))
    assert gk.gguf_linear(torch.zeros(0, 64), blocks, "Q4_1", 10).shape == (0, 10)


@pytest.mark.parametrize("qtype", gk.SUPPORTED_TYPES)
def test_fallback_without_kernel_is_float32_on_dequantized_weight(qtype: str, monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    gen = torch.Generator().manual_seed(4)
    blocks = gk.quantize(_weight(gen, 9, 96), qtype)
    x = _activations(gen, 5, 96)
    _assert_within(gk.gguf_linear(x, blocks, qtype, 9), _reference(x, blocks, qtype), _float_bound(x, blocks, qtype))


@pytest.mark.slow
def test_kernel_in_a_compiled_graph() -> None:
    _kernel()
    gen = torch.Generator().manual_seed(5)
    blocks = gk.quantize(_weight(gen, 24, 64), "Q8_0")
    table = gk.quantize(_weight(gen, 16, 64), "Q4_0")

    def f(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(gk.gguf_linear(x, blocks, "Q8_0", 24)).sum(-1, keepdim=True)
        return hidden * gk.gguf_embedding(ids, table, "Q4_0", 64) + gk.dequantize(table, "Q4_0", 64)[0]

    x, ids = _activations(gen, 3, 64), torch.tensor([1, 15, 1])
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x, ids), f(x, ids), rtol=1e-5, atol=0)


# -- the scalar and non-VNNI code paths, built separately ---------------------------------------------------
# -march=native compiles only one of the kernel's paths; these builds compile the others, each into its own
# op namespace, so the fallbacks for older CPUs are checked against the same bounds on this machine.
VARIANTS = {"graphcap_gguf_scalar": ["-O2", "-march=x86-64"], "graphcap_gguf_avx2": ["-O3", "-march=haswell"]}


def _variant(name: str):
    from torch.utils.cpp_extension import load

    from graphcap.common.digest import default_cache_dir

    source = cpu_kernels.CSRC / "gguf_linear.cpp"
    flags = [*VARIANTS[name], f"-DGGUF_LINEAR_LIBRARY={name}"]
    key = "|".join([source.read_text(), *flags, torch.__version__])
    build_dir = default_cache_dir() / "kernels" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=[str(source)], extra_cflags=flags, build_directory=str(build_dir),
         is_python_module=False, verbose=False)
    return getattr(torch.ops, name).gguf_linear


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the variants are x86 builds")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("qtype", gk.SUPPORTED_TYPES)
def test_other_code_paths_within_bounds(variant: str, qtype: str) -> None:
    _kernel()  # a compiler is there
    op = _variant(variant)
    gen = torch.Generator().manual_seed(6)
    for m, n, nb in [(1, 17, 18), (5, 9, 3), (16, 33, 48)]:
        k = nb * gk.BLOCK
        blocks = _gguf_quantize(_weight(gen, n, k), qtype)
        x = _activations(gen, m, k)
        want = _reference(x, blocks, qtype)
        _assert_within(op(x, blocks, gk.TYPE_CODES[qtype], INTEGER_ONLY), want, _integer_bound(x, blocks, qtype))
        _assert_within(op(x, blocks, gk.TYPE_CODES[qtype], GEMM_ALWAYS), want, _float_bound(x, blocks, qtype))


# -- errors ---------------------------------------------------------------------------------------------------
def test_errors_name_the_shape_and_type() -> None:
    blocks = gk.quantize(torch.randn(4, 64), "Q4_1")
    with pytest.raises(ValueError, match=r"Q4_1 needs in_features \(the last dimension of x, shape \(2, 40\)\) "
                                         r"to be a multiple of 32; got 40"):
        gk.gguf_linear(torch.randn(2, 40), blocks, "Q4_1", 4)
    with pytest.raises(ValueError, match=r"2-d uint8 tensor.*torch.float32 of shape \(4, 64\)"):
        gk.gguf_linear(torch.randn(2, 64), torch.randn(4, 64), "Q4_1", 4)
    with pytest.raises(ValueError, match=r"Q8_0 rows of 64 weights take 68 bytes; blocks have 40"):
        gk.gguf_linear(torch.randn(2, 64), blocks, "Q8_0", 4)
    with pytest.raises(ValueError, match=r"'Q5_K' is not supported \(supported: Q8_0, Q4_0, Q4_1\)"):
        gk.dequantize(blocks, "Q5_K", 64)
    with pytest.raises(ValueError, match=r"blocks have 4 rows, not out_features=5"):
        gk.gguf_linear(torch.randn(2, 64), blocks, "Q4_1", 5)
    with pytest.raises(ValueError, match=r"Q4_0 quantises 2-d weights whose columns are a multiple of 32"):
        gk.quantize(torch.randn(3, 48), "Q4_0")
