"""The graph cache entry of one rank's runner: which engine facts its key covers (graph/cache.py has the
rest of the key and the mechanics)."""

from __future__ import annotations

import dataclasses

import torch

from graphcap.config import EngineConfig
from graphcap.executor.model_runner import ModelRunner
from graphcap.graph.cache import GraphCache, model_digest, prefetch

# Options that say where and whether to cache, or name the checkpoint (its content is keyed instead, so a
# moved checkpoint keeps its entry); compilation_config is keyed through its own digest.
NOT_KEYED = ("model", "cache_dir", "use_cache", "graph_cache", "compilation_config", "extra")


def wants_graph_cache(cfg: EngineConfig) -> bool:
    """Off for tensor parallelism (a bucket restored on one rank and captured on another would leave the ranks
    waiting on each other), and where no backend can persist its graphs (CUDA graphs)."""
    graphs = cfg.decode_graph().mode != "eager" or cfg.prefill_graph().mode != "eager"
    return graphs and cfg.graph_cache and cfg.use_cache and cfg.tp_size == 1 and cfg.device == "cpu"


def prefetch_graph_cache(cfg: EngineConfig) -> None:
    """Before loading the weights: start what the graph cache needs and can compute meanwhile."""
    if wants_graph_cache(cfg):
        prefetch(cfg.cache_dir)


def open_graph_cache(cfg: EngineConfig, runner: ModelRunner, max_model_len: int) -> GraphCache:
    """The entry for this model and configuration (see `wants_graph_cache` for where there is none)."""
    if not wants_graph_cache(cfg):
        return GraphCache.open(cfg.cache_dir, {}, {}, enabled=False)
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_KEYED}
    parts = {
        "checkpoint": model_digest(runner.model),
        "options": options,
        "compilation": cfg.compilation().digest(),
        # what the options resolve to on this machine: compiled code is specialised on the cache's shape
        "kv_cache_slots": runner.kv_cache.k[0].shape[0] if runner.kv_cache.k else 0,
        "max_model_len": max_model_len,
        "cpu_kernels": runner.attn_backend.use_kernels,
        "threads": torch.get_num_threads(),
    }
    about = {"model": cfg.model, "dtype": cfg.dtype, "graph_decode": cfg.decode_graph().mode,
             "graph_prefill": cfg.prefill_graph().mode, "torch": torch.__version__}
    return GraphCache.open(cfg.cache_dir, parts, about)
