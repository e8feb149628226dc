"""Micro-benchmarks of the GGUF linear kernels (graphcap/ops/gguf_kernels.py) on SmolLM2-135M's shapes.

Each shape is timed as the kernel and as torch's float32 F.linear on the dequantised weight (what an engine
that expands GGUF weights at load runs). Weights are random blocks of the right shapes: the kernels' speed
does not depend on the values. Per-shape times are measured with the weight hot in cache (repeated calls);
`decode_step_rows` also times a whole step's sequence of calls over distinct weights for every layer, which is
what a real decode step sees (the weights, ~96 MB, do not stay in cache between steps).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from graphcap.bench.report import Row, make_row
from graphcap.ops import cpu_kernels
from graphcap.ops import gguf_kernels as gk

# name -> (in_features, out_features) of SmolLM2-135M's linear layers (merged qkv and gate_up included).
SHAPES: dict[str, tuple[int, int]] = {
    "q/o": (576, 576), "k/v": (576, 192), "qkv": (576, 960), "gate_up": (576, 3072), "down": (1536, 576),
    "lm_head": (576, 49152),
}
LAYERS = 30
# One decode step: every layer's merged qkv, o, merged gate_up and down, then the LM head.
STEP_CALLS = {"qkv": LAYERS, "q/o": LAYERS, "gate_up": LAYERS, "down": LAYERS, "lm_head": 1}


def median_ms(fn: Callable[[], object], repeats: int = 15, min_s: float = 0.02) -> tuple[float, float]:
    """(median, min) over `repeats` timings of fn, each a loop long enough (min_s) to swamp the clock's
    resolution. The median is the figure to quote on a shared machine; the min shows the noise."""
    fn()
    start = time.perf_counter()
    fn()
    loops = max(1, round(min_s / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t) / loops * 1e3)
    return statistics.median(times), min(times)


def _require_kernels() -> None:
    if not cpu_kernels.available():
        raise RuntimeError(f"the C++ kernels are needed: {cpu_kernels.status()}")


def _blocks(name: str, qtype: str, gen: torch.Generator) -> torch.Tensor:
    k, n = SHAPES[name]
    return gk.quantize(torch.randn(n, k, generator=gen), qtype)


def kernel_rows(qtypes: tuple[str, ...] = ("Q4_1", "Q8_0"), rows: tuple[int, ...] = (1, 16),
                threads: tuple[int, ...] = (1, 2), repeats: int = 15) -> list[Row]:
    """Kernel vs float32 F.linear per shape, type, M and thread count; `gbps` is the weight blocks' bytes
    over the kernel's time."""
    _require_kernels()
    gen = torch.Generator().manual_seed(0)
    saved, out = torch.get_num_threads(), []
    try:
        for qtype in qtypes:
            for name, (k, n) in SHAPES.items():
                blocks = _blocks(name, qtype, gen)
                weight = gk.dequantize(blocks, qtype, k)
                for m in rows:
                    x = torch.randn(m, k, generator=gen)
                    for t in threads:
                        torch.set_num_threads(t)
                        ms, ms_min = median_ms(lambda: gk.gguf_linear(x, blocks, qtype, n), repeats)
                        fp32_ms, _ = median_ms(lambda: F.linear(x, weight), repeats)
                        out.append(make_row("kernels", f"{qtype} {name} {k}->{n}", m, ms, threads=t, ms_min=ms_min,
                                            fp32_ms=fp32_ms, speedup_vs_fp32=fp32_ms / ms,
                                            gbps=blocks.numel() / (ms * 1e-3) / 1e9, qtype=qtype, shape=name))
    finally:
        torch.set_num_threads(saved)
    return out


def decode_step_rows(layer_qtype: str = "Q4_1", head_qtype: str = "Q8_0", threads: tuple[int, ...] = (1, 2),
                     rows: int = 1, repeats: int = 15) -> list[Row]:
    """The linear layers of one decode step of `rows` sequences (30 x (qkv + o + gate_up + down) + LM head;
    SmolLM2's GGUF has Q4_1 layers and a Q8_0 tied head), over distinct weights per layer so that they stream
    from memory as in a real step; and the float32 F.linear sequence on the same weights expanded."""
    _require_kernels()
    gen = torch.Generator().manual_seed(0)
    layers = [[(name, _blocks(name, layer_qtype, gen)) for name in ("qkv", "q/o", "gate_up", "down")]
              for _ in range(LAYERS)]
    calls = [call for layer in layers for call in layer] + [("lm_head", _blocks("lm_head", head_qtype, gen))]
    qtypes = [layer_qtype] * (len(calls) - 1) + [head_qtype]
    inputs = {k: torch.randn(rows, k, generator=gen) for k in {SHAPES[name][0] for name, _ in calls}}
    weights = [gk.dequantize(blocks, qtype, SHAPES[name][0]) for (name, blocks), qtype in zip(calls, qtypes)]
    step_bytes = sum(blocks.numel() for _, blocks in calls)

    def kernel_step() -> None:
        for (name, blocks), qtype in zip(calls, qtypes):
            gk.gguf_linear(inputs[SHAPES[name][0]], blocks, qtype, SHAPES[name][1])

    def fp32_step() -> None:
        for (name, _), weight in zip(calls, weights):
            F.linear(inputs[SHAPES[name][0]], weight)

    saved, out = torch.get_num_threads(), []
    try:
        for t in threads:
            torch.set_num_threads(t)
            ms, ms_min = median_ms(kernel_step, repeats, min_s=0)
            fp32_ms, _ = median_ms(fp32_step, repeats, min_s=0)
            out.append(make_row("kernels", f"decode step linears ({layer_qtype} layers, {head_qtype} head)", rows, ms,
                                threads=t, ms_min=ms_min, fp32_ms=fp32_ms, speedup_vs_fp32=fp32_ms / ms,
                                gbps=step_bytes / (ms * 1e-3) / 1e9))
    finally:
        torch.set_num_threads(saved)
    return out


def gemm_crossover_rows(rows: tuple[int, ...] = (16, 32, 64, 128, 512, 2048),
                        shapes: tuple[str, ...] = ("gate_up", "down"), qtype: str = "Q4_1",
                        repeats: int = 7) -> list[Row]:
    """The kernel's two paths at prefill sizes, forced: integer dots vs float32 GEMM on the weight expanded
    in the call (what GEMM_MIN_ROWS chooses between)."""
    _require_kernels()
    gen = torch.Generator().manual_seed(0)
    op, code, out = torch.ops.graphcap_cpu.gguf_linear, gk.TYPE_CODES[qtype], []
    for name in shapes:
        k, _ = SHAPES[name]
        blocks = _blocks(name, qtype, gen)
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            integer_ms, _ = median_ms(lambda: op(x, blocks, code, 2**62), repeats)
            gemm_ms, _ = median_ms(lambda: op(x, blocks, code, 0), repeats)
            out.append(make_row("kernels", f"{qtype} {name} paths", m, min(integer_ms, gemm_ms),
                                threads=torch.get_num_threads(), integer_ms=integer_ms, gemm_ms=gemm_ms))
    return out
