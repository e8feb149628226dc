"""`graphcap bench`: build one engine per mode over the same weights, measure every phase side by side,
and return the numbers as one JSON-ready dict (BENCHMARKS.md is the protocol).

Engines: one eager LLM (the baseline and the e2e reference), one LLM per decode graph mode (prefill
eager), one LLM per prefill graph mode (decode eager), so each row isolates one phase's mode. A mode the
engine refuses (UserError) becomes a note, never a crash and never a silently-eager row.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphcap.bench.decode import decode_rows
from graphcap.bench.e2e import NEW_TOKENS, e2e_rows, llm_contender, make_prompts
from graphcap.bench.floor import floor_rows
from graphcap.bench.llamacpp import peer_rows
from graphcap.bench.peers import gguf_file, model_source
from graphcap.bench.prefill import prefill_rows
from graphcap.bench.tp import tp_decode_rows
from graphcap.bench.report import Row, make_row
from graphcap.errors import UserError
from graphcap.models.config import parse_dtype

# Enough for the e2e requests and the largest probe batch; the engine's default (32k tokens) would cost
# half a gigabyte of KV cache per engine on `small`, and the bench builds several engines.
BENCH_KV_CACHE_TOKENS = 8192


@dataclass
class BenchOptions:
    model: str
    engine_kwargs: dict = field(default_factory=dict)
    graph_decode: list[str] = field(default_factory=lambda: ["full"])
    graph_prefill: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    iters: int = 20
    steps_per_turn: int = 4  # consecutive steps per timed turn of one mode (see verify.interleaved_timings)
    e2e_iters: int = 3
    decode_context: int = 128
    hf: bool = True
    hf_compile: bool = False
    allreduce: bool = False
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    peers: list[str] = field(default_factory=list)  # "llamacpp"
    peer_threads: list[int] = field(default_factory=lambda: [1, 2])


_stages: list[tuple[str, float]] = []  # (message, perf_counter at its start) of the current run


def stage(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table; each stage's start is kept, so the result
    says where the bench's wall time went (`stage_seconds`)."""
    now = time.perf_counter()
    elapsed = now - _stages[0][1] if _stages else 0.0
    _stages.append((message, now))
    print(f"bench [{elapsed:6.1f} s]: {message}", file=sys.stderr, flush=True)


def _stage_seconds() -> list[list]:
    """[message, seconds] per stage of this run, each up to the next stage's start (the last, to now)."""
    ends = [t for _, t in _stages[1:]] + [time.perf_counter()]
    return [[message, round(end - start, 1)] for (message, start), end in zip(_stages, ends)]


@dataclass
class Engine:
    llm: object
    construct_seconds: float

    def startup(self) -> dict:
        """Startup = construction minus weight loading: the capture/compile cost of the mode."""
        stats = self.llm.stats()
        info = {"construct_seconds": round(self.construct_seconds, 3), "load_seconds": stats["load_seconds"],
                "startup_seconds": round(self.construct_seconds - self.llm.load_seconds, 3)}
        for phase in ("decode", "prefill"):
            runner = stats.get(phase) or {}
            if runner.get("mode", "eager") != "eager":
                info[phase] = {k: runner.get(k) for k in ("mode", "captured", "capture_seconds",
                                                          "graph_memory_bytes", "buckets")}
        report = stats.get("compile") or {}
        if report:  # the compilation layer's report: pieces, unique compiles, seconds, cache, pass matches
            info["cache"] = report.get("cache")
            info["compile"] = report
        return info


def _build(model: str, kwargs: dict) -> Engine:
    from graphcap import LLM

    t0 = time.perf_counter()
    llm = LLM(model, **kwargs)
    return Engine(llm, time.perf_counter() - t0)


def _device_info(kwargs: dict) -> str:
    device = kwargs.get("device", "cpu")
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name()})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()})"


def run_bench(opts: BenchOptions) -> dict:
    kw = dict(opts.engine_kwargs)
    if kw.get("kv_cache_tokens") is None and kw.get("kv_cache_memory_fraction") is None:
        kw["kv_cache_tokens"] = BENCH_KV_CACHE_TOKENS
    notes: list[str] = []
    if opts.threads:
        torch.set_num_threads(opts.threads)
        kw["threads"] = opts.threads  # the engines keep the bench's thread count, not every core
    load_before = os.getloadavg()

    _stages.clear()
    stage("building the eager engine")
    engines = {"eager": _build(opts.model, {**kw, "graph_decode": "eager", "graph_prefill": "eager"})}
    cache_root = Path(tempfile.mkdtemp(prefix="graphcap-bench-cache-"))
    results: list[Row] = []
    try:
        decode_engines = _graph_engines(opts.model, kw, "graph_decode", opts.graph_decode, notes, cache_root)
        prefill_engines = _graph_engines(opts.model, kw, "graph_prefill", opts.graph_prefill, notes, cache_root)
        engines.update(decode_engines)
        engines.update({f"prefill:{m}": e for m, e in prefill_engines.items()})
        eager = engines["eager"].llm
        attention_kernel = eager.stats().get("attention_kernel", "torch")
        dtype = str(parse_dtype(eager.config.dtype)).removeprefix("torch.")
        stage(f"decode steps: batch sizes {opts.batch_sizes}, {opts.iters} interleaved turns of "
              f"{opts.steps_per_turn} step(s)")
        if kw.get("tp_size", 1) > 1:
            results += tp_decode_rows(eager, {m: e.llm for m, e in decode_engines.items()}, opts.batch_sizes,
                                      opts.iters, opts.decode_context, opts.steps_per_turn)
            notes.append("under TP, prefill step rows and the bandwidth floor are not measured (the model lives "
                         "in the ranks); decode rows and e2e go through the TP engines")
            results += _e2e(opts, eager, engines, notes)
        else:
            results += decode_rows(eager, {m: e.llm for m, e in decode_engines.items()}, opts.batch_sizes,
                                   opts.iters, opts.decode_context, opts.steps_per_turn)
            stage("prefill steps")
            results += prefill_rows(eager, {m: e.llm for m, e in prefill_engines.items()}, opts.iters,
                                   opts.steps_per_turn)
            results += _e2e(opts, eager, engines, notes)
            if "llamacpp" in opts.peers:
                mode, engine = next(iter(decode_engines.items()), ("eager", engines["eager"]))
                stage(f"llama.cpp peer at {opts.peer_threads} thread(s), {opts.e2e_iters} round(s)")
                results += peer_rows(engine.llm, gguf_file(opts.model), mode, opts.peer_threads, opts.e2e_iters,
                                     notes)
            stage("bandwidth floor")
            results += floor_rows(eager.runner.model, gguf_file(opts.model))
            if dtype != "float32":
                results += _dtype_rows(opts.model, kw, engines)
                notes.append(f"{dtype}: the step rows' max|diff| and tokens= compare graph with eager on probes of "
                             "random tokens and random KV contents, where rounding alone moves a real model's "
                             "logits far more than on text; the dtype rows measure accuracy against float32")
        if opts.allreduce or kw.get("tp_size", 1) > 1:
            results += _allreduce_rows(max(2, kw.get("tp_size", 1)), notes)
        warm = _warm_startups(opts.model, kw, engines, notes)
        compile_info = {name: e.startup() for name, e in engines.items()}
        for name, seconds in warm.items():
            compile_info[name]["warm_startup_seconds"] = seconds
        stage("done")
    finally:
        for e in engines.values():
            e.llm.shutdown()
        shutil.rmtree(cache_root, ignore_errors=True)
    return {
        "device": _device_info(kw),
        "torch": torch.__version__,
        "model": opts.model,
        "source": model_source(opts.model),
        "dtype": dtype,
        "engine": {**{k: v for k, v in kw.items() if k not in ("graph_decode", "graph_prefill")},
                   "attention_kernel": attention_kernel},
        "timing": {"iters": opts.iters, "steps_per_turn": opts.steps_per_turn},
        "startup_seconds": {name: info["startup_seconds"] for name, info in compile_info.items()},
        "results": results,
        "compile": compile_info,
        "stage_seconds": _stage_seconds(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": {"start": [round(x, 2) for x in load_before],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "notes": notes,
    }


def _graph_engines(model: str, kw: dict, option: str, modes: list[str], notes: list[str],
                   cache_root: Path) -> dict[str, Engine]:
    """One engine per graph mode of one phase (the other phase eager). Unless the user chose a cache
    directory, each gets an empty one, so its startup is cold and a rebuild measures warm."""
    other = "graph_prefill" if option == "graph_decode" else "graph_decode"
    engines = {}
    for mode in modes:
        if mode == "eager":
            continue
        stage(f"building the {option}={mode} engine (captures/compiles its buckets)")
        cache_dir = kw.get("cache_dir") or str(cache_root / f"{option}-{mode}")
        try:
            engines[mode] = _build(model, {**kw, option: mode, other: "eager", "cache_dir": cache_dir})
        except UserError as e:
            notes.append(f"{option}={mode}: not available in this engine ({e}); no {mode} rows")
    return engines


def _e2e(opts: BenchOptions, eager_llm, engines: dict[str, Engine], notes: list[str]) -> list[Row]:
    from graphcap.bench.e2e import Contender

    contenders: list[Contender] = [llm_contender(name, e.llm) for name, e in engines.items()]
    if opts.hf:
        stage("loading HF transformers peer(s) on the same weights")
        from graphcap.bench.peers import hf_contenders

        contenders += hf_contenders(opts.model, opts.hf_compile, notes, parse_dtype(eager_llm.config.dtype))
    stage(f"end-to-end generation: {', '.join(c.mode for c in contenders)}, {opts.e2e_iters} round(s)")
    rows = e2e_rows(contenders, make_prompts(eager_llm.model_config.vocab_size), opts.e2e_iters)
    short = [f"{r['mode']} ({r['short_requests']})" for r in rows if r["short_requests"]]
    if short:
        notes.append(f"e2e requests that ended before {NEW_TOKENS} tokens (tokens/s counts what they made): "
                     + ", ".join(short))
    return rows


def _dtype_rows(model: str, kw: dict, engines: dict[str, Engine]) -> list[Row]:
    """A reduced-precision run's accuracy against a float32 eager engine on the same weights and prompts:
    our eager, and each graph engine through its graph dispatch (graphcap.bench.accuracy)."""
    from graphcap.bench.accuracy import accuracy_prompts, compare_dtypes, reference

    stage("dtype accuracy: a float32 eager engine, then each engine against it")
    ref_engine = _build(model, {**kw, "dtype": "float32", "graph_decode": "eager", "graph_prefill": "eager"})
    try:
        ref = reference(ref_engine.llm, accuracy_prompts(ref_engine.llm))
    finally:
        ref_engine.llm.shutdown()
    rows = []
    for name, e in engines.items():
        acc = compare_dtypes(ref, e.llm, graphs=name != "eager", mode=name)
        extra = {k: v for k, v in acc.as_dict().items() if k not in ("mode", "max_abs_diff")}
        rows.append(make_row("dtype", name, acc.prompts, None, None, acc.max_abs_diff,
                             acc.free_run_equal == acc.prompts, **extra))
    return rows


def _warm_startups(model: str, kw: dict, engines: dict[str, Engine], notes: list[str]) -> dict[str, float]:
    """Build again each engine whose cold build stored artifacts (cache "miss"), to time a warm start."""
    warm = {}
    for name, e in engines.items():
        if (e.llm.stats().get("compile") or {}).get("cache") != "miss":
            continue
        stage(f"warm start of {name} (its artifacts are in the cache now)")
        cfg = e.llm.config
        again = _build(model, {**kw, "graph_decode": cfg.graph_decode, "graph_prefill": cfg.graph_prefill,
                               "cache_dir": cfg.cache_dir})
        warm[name] = round(again.construct_seconds - again.llm.load_seconds, 3)
        again.llm.shutdown()
    if not warm:
        notes.append("no engine stored compiled artifacts in a cache: startup is one (cold) number per mode; "
                     "Inductor's own on-disk cache may still make it warmer than a first run on a fresh machine")
    return warm


def _allreduce_rows(world_size: int, notes: list[str]) -> list[Row]:
    try:
        from graphcap.bench.allreduce import measure_allreduce
    except ImportError as e:
        notes.append(f"all-reduce benchmark unavailable ({e})")
        return []
    stage(f"all-reduce: gloo vs shared memory on {world_size} ranks")
    rows = []
    for r in measure_allreduce(world_size=world_size):
        rows.append(make_row("allreduce", "gloo", world_size, r["gloo_us"] / 1e3, 1.0, size_bytes=r["size_bytes"],
                             us_median=r["gloo_us"]))
        rows.append(make_row("allreduce", "shm", world_size, r["shm_us"] / 1e3, r["speedup"],
                             size_bytes=r["size_bytes"], us_median=r["shm_us"]))
    return rows
