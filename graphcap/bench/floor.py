"""The bandwidth floor of a decode step: weight bytes read once per step / copy bandwidth measured now.

Bandwidth is measured in the same run (same machine load) with a large tensor copy; a copy reads and
writes each byte, so it moves 2x its size. The floor ignores the KV cache and activations, so real steps
can only be slower; the ratio step/floor says how far from bandwidth-bound a mode is.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from graphcap.bench.report import Row, make_row

COPY_BYTES = 256 * 2**20


def weight_bytes_per_decode_step(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every weight, except the embedding table when untied (a step
    reads only batch-size rows of it); a tied table is read whole by the LM head."""
    params = dict(model.named_parameters())
    tied = not any("lm_head" in name for name in params)
    total = 0
    for name, p in params.items():
        if "embed_tokens" in name and not tied:
            continue
        total += p.numel() * p.element_size()
    for name, b in model.named_buffers():
        if name.endswith(".weight") or name.endswith("_scale"):  # quantized weights and their scales
            total += b.numel() * b.element_size()
    return total


def copy_bandwidth_gbps(nbytes: int = COPY_BYTES, iters: int = 7) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


def gguf_bytes_per_decode_step(path: Path) -> tuple[int, str]:
    """Bytes a decode step reads from a GGUF file's tensors as stored (quantised blocks), by the same rule
    as `weight_bytes_per_decode_step`; and the storage types, most bytes first (e.g. "Q4_1+Q8_0+F32")."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            continue
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return sum(by_type.values()), "+".join(sorted(by_type, key=by_type.get, reverse=True))


def floor_rows(model: nn.Module, gguf: Path | None = None) -> list[Row]:
    """The floor of the engine's weights as loaded (in its dtype; a GGUF is dequantised), and, for a GGUF
    source, of the file's blocks as stored: what an engine computing on them (llama.cpp) reads."""
    weight = weight_bytes_per_decode_step(model)
    dtype = next(model.parameters()).dtype
    gbps = copy_bandwidth_gbps()
    rows = [make_row("floor", f"engine weights ({str(dtype).removeprefix('torch.')})/bandwidth", None,
                     weight / (gbps * 1e9) * 1e3, bandwidth_gbps=gbps, weight_mb=weight / 1e6)]
    if gguf is not None:
        stored, types = gguf_bytes_per_decode_step(gguf)
        rows.append(make_row("floor", f"gguf blocks ({types})/bandwidth", None, stored / (gbps * 1e9) * 1e3,
                             bandwidth_gbps=gbps, weight_mb=stored / 1e6))
    return rows
