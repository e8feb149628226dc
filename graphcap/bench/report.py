"""Benchmark rows and their rendering: one flat dict per measurement, printed as a table per phase.

Rows are plain dicts so `--json` writes exactly what the table shows. A phase's table columns live in
`COLUMNS`: adding a phase (encoders, all-reduce, ...) is adding its rows and one entry there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

Row = dict[str, Any]


def make_row(
    phase: str,
    mode: str,
    batch_size: int | None,
    ms_median: float | None,
    speedup_vs_eager: float | None = None,
    max_abs_diff: float | None = None,
    tokens_equal: bool | None = None,
    **extra: Any,
) -> Row:
    """The fields every row has (the JSON schema's core), plus phase-specific extras."""
    return {"phase": phase, "mode": mode, "batch_size": batch_size, "ms_median": ms_median,
            "speedup_vs_eager": speedup_vs_eager, "max_abs_diff": max_abs_diff, "tokens_equal": tokens_equal,
            **extra}


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, fmt)


def _bool(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def _speedup(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _graph_steps(row: Row) -> str:
    """`replays/fallbacks`, with the reason when a step fell back, so a fallback never reads as a graph."""
    if row.get("replays") is None:
        return "-"
    text = f"{row['replays']}/{row['fallbacks']}"
    reasons = row.get("fallback_reasons")
    return f"{text} ({', '.join(sorted(reasons))})" if reasons else text


def _agreement(row: Row) -> str:
    return f"{row['argmax_agree']}/{row['rows']}"


# phase -> [(header, key or row function, formatter)]
Column = tuple[str, str | Callable[[Row], Any], Callable[[Any], str]]
_STEP: list[Column] = [
    ("mode", "mode", str), ("bs", "batch_size", _num("d")), ("ms/step", "ms_median", _num(".3f")),
    ("speedup", "speedup_vs_eager", _speedup), ("max|diff|", "max_abs_diff", _num(".2e")),
    ("tokens=", "tokens_equal", _bool), ("replays/fallbacks", _graph_steps, str),
]
_E2E: list[Column] = [
    ("mode", "mode", str), ("requests", "batch_size", _num("d")), ("ms", "ms_median", _num(".1f")),
    ("tokens/s", "tokens_per_s", _num(".1f")), ("speedup", "speedup_vs_eager", _speedup),
    ("tokens=", "tokens_equal", _bool),
]
COLUMNS: dict[str, list[Column]] = {
    "decode": _STEP,
    "prefill": [("case", "case", str), ("tokens", "tokens", _num("d"))] + _STEP,
    "e2e": _E2E,
    "peer": _E2E,
    "kernels": [("kernel", "mode", str), ("rows", "batch_size", _num("d")), ("threads", "threads", _num("d")),
                ("ms", "ms_median", _num(".3f")), ("fp32 ms", "fp32_ms", _num(".3f")),
                ("vs fp32", "speedup_vs_fp32", _speedup), ("GB/s", "gbps", _num(".1f")),
                ("integer ms", "integer_ms", _num(".3f")), ("float GEMM ms", "gemm_ms", _num(".3f"))],
    "llamacpp": [("row", "mode", str), ("threads", "threads", _num("d")), ("requests", "batch_size", _num("d")),
                 ("graphcap", "graphcap", _num(".2f")), ("llama.cpp", "llamacpp", _num(".2f")),
                 ("unit", "unit", str), ("graphcap faster by", "speedup_vs_peer", _speedup)],
    "floor": [("what", "mode", str), ("ms/step", "ms_median", _num(".3f")), ("GB/s", "bandwidth_gbps", _num(".2f")),
              ("weight MB read/step", "weight_mb", _num(".1f"))],
    "dtype": [("mode", "mode", str), ("dtype", "dtype", str), ("rel err", "rel_err", _num(".2e")),
              ("prefill", "prefill_rel_err", _num(".2e")), ("decode", "decode_rel_err", _num(".2e")),
              ("max|diff|", "max_abs_diff", _num(".2e")), ("argmax=", _agreement, str),
              ("max margin of a miss", lambda r: max(r["disagree_margins"], default=None), _num(".3f")),
              ("free-run equal", lambda r: f"{r['free_run_equal']}/{r['prompts']}", str),
              ("graph steps", "graph_steps", _num("d"))],
    "allreduce": [("path", "mode", str), ("bytes", "size_bytes", _num("d")), ("us", "us_median", _num(".1f")),
                  ("speedup", "speedup_vs_eager", _speedup)],
    "encoder": [("mode", "mode", str), ("bs", "batch_size", _num("d")), ("seq", "seq_len", _num("d")),
                ("ms", "ms_median", _num(".3f")), ("speedup", "speedup_vs_eager", _speedup),
                ("max|diff|", "max_abs_diff", _num(".2e")), ("reason", "reason", lambda v: v or "-")],
}
TITLES = {
    "decode": "Decode step latency (graph vs eager, interleaved on the same batch)",
    "prefill": "Prefill step latency",
    "e2e": "End-to-end generation: 16 requests x 32 prompt tokens, 64 new tokens (greedy, ignore_eos)",
    "peer": "Peers on the identical weights, same prompts (timed round-robin with the e2e rows)",
    "kernels": "Block-quantised linear kernels vs torch fp32 F.linear on the dequantised weight (SmolLM2 shapes, "
               "random blocks)",
    "llamacpp": "llama.cpp on the same GGUF file, same prompt and thread count (turns interleaved; batch 1: "
                "ms per generated token, prefill excluded)",
    "floor": "Bandwidth floor (weights read per decode step / measured copy bandwidth)",
    "dtype": "Reduced precision against float32 on the same weights: fixed prompts, the float32 greedy tokens fed "
             "to both (rel err = max |logits - fp32| / max |fp32|), then free-running greedy generation",
    "allreduce": "All-reduce (gloo vs shared memory, rank 0)",
    "encoder": "Encoder forward + pooling per (batch, seq) bucket (graph vs eager, interleaved)",
}


def format_tables(rows: list[Row]) -> str:
    """One aligned table per phase, in the order phases first appear."""
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    out = []
    for phase in phases:
        cols = COLUMNS.get(phase, COLUMNS["decode"])
        body = [[fmt(key(r) if callable(key) else r.get(key)) for _, key, fmt in cols]
                for r in rows if r["phase"] == phase]
        heads = [h for h, _, _ in cols]
        widths = [max(len(x) for x in col) for col in zip(heads, *body)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [heads, *body]]
        out.append(f"{TITLES.get(phase, phase)}\n" + "\n".join(lines))
    return "\n\n".join(out)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def _startup_lines(compile_info: dict) -> list[str]:
    lines = []
    for name, info in compile_info.items():
        parts = [f"startup {info['startup_seconds']:.1f} s (load {info['load_seconds']:.1f} s)"]
        if "cache" in info:
            parts.append(f"artifact cache {info['cache']}")
        if "warm_startup_seconds" in info:
            parts.append(f"warm {info['warm_startup_seconds']:.1f} s")
        if "compile" in info:
            c = info["compile"]
            parts.append(f"{c['pieces']} pieces, {c['unique_compiles']} unique compiles, pass matches {c['passes']}")
        for phase in ("decode", "prefill"):
            if phase in info:
                runner = info[phase]
                parts.append(f"{phase} buckets on graph {runner['captured']}, "
                             f"graph memory {(runner['graph_memory_bytes'] or 0) / 2**20:.1f} MiB")
        lines.append(f"  {name}: " + "; ".join(parts))
    return lines


def _timing(result: dict) -> str:
    timing = result.get("timing") or {}
    return (f"medians of {timing.get('iters', '?')} alternating turns of "
            f"{timing.get('steps_per_turn', 1)} consecutive step(s) per mode")


def render(result: dict) -> str:
    """The whole report as printed on stdout: header, one table per phase, startup/memory, notes."""
    kernel = result["engine"].get("attention_kernel", "torch")
    source = result.get("source")
    model = result["model"] + (f" ({source})" if source and source != result["model"] else "")
    head = (f"graphcap bench: model {model}, dtype {result.get('dtype', 'float32')}, on {result['device']}, "
            f"torch {result['torch']}, "
            f"attention kernels: {kernel}; step rows: {_timing(result)}; "
            f"load average {result['load_average']['start']} -> {result['load_average']['end']}")
    parts = [head, format_tables(result["results"]),
             "Startup and memory\n" + "\n".join(_startup_lines(result["compile"]))
             + f"\n  peak RSS of the bench process: {result['peak_rss_bytes'] / 2**20:.0f} MiB"]
    stages = result.get("stage_seconds")
    if stages:
        total = sum(seconds for _, seconds in stages)
        parts.append(f"Bench wall time {total:.0f} s\n" + "\n".join(f"  {seconds:7.1f} s  {message}"
                                                                     for message, seconds in stages
                                                                     if message != "done"))
    if result["notes"]:
        parts.append("Notes\n" + "\n".join(f"  - {n}" for n in result["notes"]))
    return "\n\n".join(parts)
