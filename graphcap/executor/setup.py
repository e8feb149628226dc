"""Building one rank's executor: the model (quantised, custom ops as configured), its KV cache, the model
runner, and the graph runners captured for each phase.

The engine calls this in-process for tp_size=1; every tensor-parallel worker calls it for its own rank,
so graphs are built and captured the same way in both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from graphcap.compilation.backend import PiecewiseCompiler, build_compiler
from graphcap.common.digest import digest_of
from graphcap.config import EngineConfig
from graphcap.errors import UserError
from graphcap.batch.forward_batch import ForwardMode
from graphcap.executor.kv_cache import KVCache
from graphcap.executor.graph_cache import open_graph_cache, prefetch_graph_cache
from graphcap.executor.loader import ModelSource, build_model
from graphcap.executor.model_runner import ModelRunner
from graphcap.graph.reference import release_float64_copy
from graphcap.graph.runners.decode import DecodeGraphRunner
from graphcap.graph.runners.prefill import PrefillGraphRunner
from graphcap.layers.custom_op import enabled_custom_ops
from graphcap.layers.quantization import quant_method_factory
from graphcap.models.config import parse_dtype
from graphcap.ops import cpu_kernels

log = logging.getLogger("graphcap")

DEFAULT_KV_CACHE_TOKENS = 32768


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device='cuda' was requested but no CUDA device is available")
    return torch.device(cfg.device)


def max_model_len(cfg: EngineConfig, source: ModelSource) -> int:
    limit = source.config.max_position_embeddings
    return min(cfg.max_model_len or limit, limit)


def kv_cache_tokens(cfg: EngineConfig, source: ModelSource, device: torch.device) -> int:
    if cfg.kv_cache_tokens is not None:
        return cfg.kv_cache_tokens
    if cfg.kv_cache_memory_fraction is not None:
        m = source.config
        per_token = KVCache.bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, parse_dtype(cfg.dtype))
        return max(cfg.page_size, int(_available_memory(device) * cfg.kv_cache_memory_fraction) // per_token)
    return DEFAULT_KV_CACHE_TOKENS


def resolve_quantization(cfg: EngineConfig, source: ModelSource, device: torch.device) -> str | None:
    """`quantization=None` means: a quantised GGUF computes on its own blocks where graphcap's block kernels
    run (CPU, one rank); anything else loads unquantised. An explicit "gguf" must be possible."""
    blocks = source.block_weights is not None
    if cfg.quantization is None:
        return "gguf" if blocks and device.type == "cpu" and cfg.tp_size == 1 else None
    if cfg.quantization == "gguf":
        if not blocks:
            raise UserError(f"--quantization gguf needs a GGUF file with quantised tensors; {source.name} has none")
        if device.type != "cpu":
            raise UserError("--quantization gguf runs on CPU (graphcap's block kernels); on CUDA use "
                            "--quantization none")
        if cfg.tp_size > 1:
            raise UserError("--quantization gguf runs on one rank; for tensor parallelism use --quantization none")
    return cfg.quantization


def custom_ops_for(cfg: EngineConfig) -> frozenset[str]:
    """Layers routed through custom ops: the configured ones, and all of them for FP8, whose fusion
    passes match the custom RMSNorm and activation ops."""
    fp8 = (cfg.quantization or "").startswith("fp8")
    return cfg.compilation().custom_ops | (frozenset({"all"}) if fp8 else frozenset())


def build_local_runner(cfg: EngineConfig, source: ModelSource) -> ModelRunner:
    """Load the model for this rank and capture its graphs; the runner's `compiler` holds the compile report."""
    device = resolve_device(cfg)
    dtype = parse_dtype(cfg.dtype)
    custom_ops = custom_ops_for(cfg)
    torch.set_num_threads(cfg.intra_op_threads())
    prefetch_graph_cache(cfg)
    t0 = time.perf_counter()
    quantization = resolve_quantization(cfg, source, device)
    factory = quant_method_factory(quantization)
    with enabled_custom_ops(custom_ops):
        model = build_model(source, dtype, device, factory, keep_blocks=quantization == "gguf")
    conversions = getattr(factory, "summary", lambda: None)()
    if conversions:
        log.warning("graphcap: %s", conversions)
    t_kernels = time.perf_counter()
    use_kernels = device.type == "cpu" and cfg.cpu_kernels and cpu_kernels.available()
    kernel_seconds = time.perf_counter() - t_kernels
    runner = ModelRunner(model, source.config, dtype, device, kv_cache_tokens(cfg, source, device), cfg.page_size,
                         use_kernels)
    runner.kernel_build_seconds = kernel_seconds
    runner.load_seconds = time.perf_counter() - t0 - kernel_seconds
    decode_cfg, prefill_cfg = cfg.decode_graph(), cfg.prefill_graph()
    if "piecewise" in (decode_cfg.mode, prefill_cfg.mode):
        runner.compiler = _make_compiler(cfg, source, dtype, device, custom_ops, quantization)
    limit = max_model_len(cfg, source)
    runner.graph_cache = open_graph_cache(cfg, runner, limit)
    if decode_cfg.mode != "eager":
        decode = DecodeGraphRunner(runner, decode_cfg, cfg.max_running_requests, limit, runner.compiler)
        decode.capture(runner.graph_cache)
        runner.graph_runners[ForwardMode.DECODE] = decode
    if prefill_cfg.mode != "eager":
        prefill = PrefillGraphRunner(runner, prefill_cfg, cfg.max_prefill_tokens, limit, runner.compiler)
        prefill.capture(runner.graph_cache)
        runner.graph_runners[ForwardMode.PREFILL] = prefill
    runner.graph_cache.save()
    release_float64_copy(runner)
    if runner.compiler is not None:
        log.info("compilation: %s", runner.compiler.summary())
    return runner


def _make_compiler(
    cfg: EngineConfig, source: ModelSource, dtype: torch.dtype, device: torch.device, custom_ops: frozenset[str],
    quantization: str | None,
) -> PiecewiseCompiler:
    model = {"config": dataclasses.asdict(source.config), "dtype": str(dtype), "device": device.type,
             "quantization": quantization, "custom_ops": sorted(custom_ops), "tp_size": cfg.tp_size}
    return build_compiler(cfg.compilation(), digest_of(model), device)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
