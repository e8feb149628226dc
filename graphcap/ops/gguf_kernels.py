"""Linear layers and embeddings on GGUF quantised blocks (Q8_0, Q4_0, Q4_1), kept in GGUF's own layout.

A block encodes 32 consecutive weights of one row with an fp16 scale `d` (Q4_1 also an fp16 min `m`):
Q8_0 is d + 32 int8 (w = d q), Q4_0 is d + 16 bytes of nibbles (w = d (q - 8)), Q4_1 is d, m + 16 bytes of
nibbles (w = d q + m); byte j of a 4-bit block holds element j in its low nibble and element j + 16 in its
high one. Keeping GGUF's layout lets a GGUF file's tensors be used as read, memory-mapped, with no repacking.

`gguf_linear` runs the C++ kernel (graphcap/ops/csrc/gguf_linear.cpp) when it is built; `dequantize` is the
torch formulation of the same numbers, used as the fallback and as the tests' reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from graphcap.ops import cpu_kernels

SUPPORTED_TYPES = ("Q8_0", "Q4_0", "Q4_1")
BLOCK = 32
BYTES_PER_BLOCK = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
# The C++ op takes the type as an int; these codes are the kernel's kQ8_0, kQ4_0, kQ4_1.
TYPE_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2}
# From this many rows of x on, the kernel expands the weight to float32 (in cache-sized chunks) and calls the
# float GEMM instead of its integer dots: the integer kernel's cost grows with every row at a fixed rate
# (unpack, dot, convert and scale per block and row), while the expansion is paid once per call and the
# float GEMM, register-blocked and on the CPU's widest vectors, costs less per row. Measured on SmolLM2's
# shapes at 1 thread, the two are level between 64 rows (integer dots 5-10% faster) and 96 (10-17% slower).
GEMM_MIN_ROWS = 80


def _check_type(qtype: str) -> None:
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF block type {qtype!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")


def check_blocks(blocks: torch.Tensor, qtype: str, in_features: int, source: str = "") -> None:
    """Every entry point validates up front: a wrong byte count would otherwise read another row's blocks.
    `source` says where in_features came from, for the message."""
    _check_type(qtype)
    if in_features % BLOCK:
        raise ValueError(f"{qtype} needs in_features{source} to be a multiple of {BLOCK}; got {in_features}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise ValueError(f"{qtype} blocks must be a 2-d uint8 tensor [rows, bytes per row]; "
                         f"got {blocks.dtype} of shape {tuple(blocks.shape)}")
    want = in_features // BLOCK * BYTES_PER_BLOCK[qtype]
    if blocks.shape[1] != want:
        raise ValueError(f"{qtype} rows of {in_features} weights take {want} bytes; blocks have {blocks.shape[1]}")


def dequantize(blocks: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """[N, bytes per row] uint8 -> [N, in_features] float32, with the gguf package's exact arithmetic (the
    same products and sums in float32, so the results match it bitwise)."""
    check_blocks(blocks, qtype, in_features)
    n, nb = blocks.shape[0], in_features // BLOCK
    raw = blocks.contiguous().view(n, nb, BYTES_PER_BLOCK[qtype])
    halves = raw.view(torch.float16).float()  # every 2-byte pair; [..., 0] is d, [..., 1] Q4_1's m
    d = halves[..., :1]
    if qtype == "Q8_0":
        values = raw[..., 2:].view(torch.int8).float() * d
    else:
        nibbles = raw[..., 4:] if qtype == "Q4_1" else raw[..., 2:]
        q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float()
        values = q * d + halves[..., 1:2] if qtype == "Q4_1" else (q - 8.0) * d
    return values.reshape(n, in_features)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero with the gguf package's formula: floor(|x| + 0.5) differs from it for the
    float just below 0.5, whose sum with 0.5 rounds up to 1."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def quantize(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """[N, K] float -> [N, K/32 * bytes per block] uint8 blocks, bit for bit what gguf.quants.quantize writes
    (same float32 operations), but in torch: fast enough to quantise a checkpoint while it loads."""
    _check_type(qtype)
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"{qtype} quantises 2-d weights whose columns are a multiple of {BLOCK}; "
                         f"got shape {tuple(weight.shape)}")
    n, k = weight.shape
    x = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if qtype == "Q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        inverse = torch.where(d == 0, 0.0, 1 / d)
        q = _round_half_away(x * inverse).to(torch.int8).view(torch.uint8)
        parts = [d.half()]
    else:
        if qtype == "Q4_0":
            top = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))  # signed value of largest magnitude
            d = top / -8
            low, bias = None, 8.5
        else:
            low = x.amin(dim=-1, keepdim=True)
            d = (x.amax(dim=-1, keepdim=True) - low) / 15
            bias = 0.5
        inverse = torch.where(d == 0, 0.0, 1 / d)
        shifted = x if low is None else x - low
        q = (shifted * inverse + bias).trunc().clamp(0, 15).to(torch.uint8)
        q = q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
        parts = [d.half()] if low is None else [d.half(), low.half()]
    scales = torch.cat(parts, dim=-1).view(torch.uint8)
    return torch.cat([scales, q], dim=-1).reshape(n, -1)


@torch.compiler.assume_constant_result
def _kernel_ready() -> bool:
    """Whether the C++ op exists; a compiled graph bakes in the answer instead of tracing the build's lock."""
    return cpu_kernels.available()


@contextmanager
def float_only() -> Iterator[None]:
    """Every block-quantised linear computes in float32 on the expanded weight while inside (the kernel's
    own switch, so compiled graphs obey it too): capture verifies graphs this way, where eager's error against
    float64 is float rounding rather than 8-bit activation rounding, which could hide a graph's fault."""
    if not cpu_kernels.available():
        yield  # the torch fallback computes in float32 already
        return
    torch.ops.graphcap_cpu.gguf_float_only(True)
    try:
        yield
    finally:
        torch.ops.graphcap_cpu.gguf_float_only(False)


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int) -> torch.Tensor:
    """x [..., K] @ W^T for W given as blocks [N, K/32 * bytes per block] -> float32 [..., N].

    The kernel quantises x to int8 per 32-wide block for the small batches of decode (error bounded in the
    tests), and computes in float32 on the expanded weight from GEMM_MIN_ROWS rows on; without the C++ build,
    the weight is expanded in torch and every batch is computed in float32.
    """
    in_features = x.shape[-1]
    check_blocks(blocks, qtype, in_features, f" (the last dimension of x, shape {tuple(x.shape)})")
    if blocks.shape[0] != out_features:
        raise ValueError(f"{qtype} blocks have {blocks.shape[0]} rows, not out_features={out_features}")
    flat = x.dim() == 2  # the decode case: no reshapes, each costs about a microsecond of Python per layer
    x2 = (x if flat else x.reshape(-1, in_features)).float()
    if _kernel_ready():
        out = torch.ops.graphcap_cpu.gguf_linear(x2, blocks, TYPE_CODES[qtype], GEMM_MIN_ROWS)
    else:
        out = x2 @ dequantize(blocks, qtype, in_features).T
    return out if flat else out.reshape(*x.shape[:-1], out_features)


def gguf_embedding(ids: torch.Tensor, blocks: torch.Tensor, qtype: str, hidden: int) -> torch.Tensor:
    """Rows `ids` of the table, float32 [..., hidden]: only the selected rows' blocks are expanded, so a table
    shared with the LM head stays quantised in memory."""
    rows = blocks[ids.reshape(-1)]
    return dequantize(rows, qtype, hidden).reshape(*ids.shape, hidden)
