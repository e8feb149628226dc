"""The offline API: `LLM(model=...).generate(...)`, shaped like vLLM's so users know it on sight."""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from graphcap.config import EngineConfig, config_from_kwargs
from graphcap.engine.request import Request, RequestOutput, Status
from graphcap.engine.sampler import sample
from graphcap.engine.sampling_params import SamplingParams
from graphcap.engine.scheduler import Scheduler
from graphcap.engine.tokenizer import Tokenizer
from graphcap.errors import UserError
from graphcap.executor.kv_cache import KVCache
from graphcap.executor.forward_batch import ForwardMode
from graphcap.executor.loader import build_model, resolve_source
from graphcap.executor.model_runner import ModelRunner
from graphcap.graph.runners.decode import DecodeGraphRunner
from graphcap.models.config import parse_dtype

log = logging.getLogger("graphcap")

DEFAULT_KV_CACHE_TOKENS = 32768


class LLM:
    def __init__(self, model: str, **kwargs) -> None:
        self.config: EngineConfig = config_from_kwargs(model, kwargs)
        cfg = self.config
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("device='cuda' was requested but no CUDA device is available")
        self.device = torch.device(cfg.device)
        self.dtype = parse_dtype(cfg.dtype)
        source = resolve_source(cfg.model)
        self.model_config = source.config
        self.tokenizer = Tokenizer(source.tokenizer_path) if source.tokenizer_path else None
        self.max_model_len = min(cfg.max_model_len or source.config.max_position_embeddings,
                                 source.config.max_position_embeddings)
        t0 = time.perf_counter()
        model_module = build_model(source, self.dtype, self.device)
        self.runner = ModelRunner(
            model_module, source.config, self.dtype, self.device, self._kv_tokens(), cfg.page_size
        )
        self.load_seconds = time.perf_counter() - t0
        self.decode_runner = self._capture_decode_graphs()
        self.scheduler = Scheduler(self.runner.pool, cfg.max_running_requests, cfg.max_prefill_tokens)
        self._next_rid = 0
        self._counters = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "prefill_steps": 0,
                          "decode_steps": 0}

    def _capture_decode_graphs(self) -> DecodeGraphRunner | None:
        graph_cfg = self.config.decode_graph()
        if graph_cfg.mode == "eager":
            return None
        runner = DecodeGraphRunner(self.runner, graph_cfg, self.config.max_running_requests, self.max_model_len)
        runner.capture()
        self.runner.graph_runners[ForwardMode.DECODE] = runner
        self.runner.graph_runners[ForwardMode.TARGET_VERIFY] = runner
        return runner

    def _kv_tokens(self) -> int:
        cfg = self.config
        if cfg.kv_cache_tokens is not None:
            return cfg.kv_cache_tokens
        if cfg.kv_cache_memory_fraction is not None:
            m = self.model_config
            per_token = KVCache.bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim, self.dtype)
            return max(cfg.page_size, int(_available_memory(self.device) * cfg.kv_cache_memory_fraction) // per_token)
        return DEFAULT_KV_CACHE_TOKENS

    # -- public API ---------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in the order given; requests are batched continuously."""
        prompt_ids = self._prompt_ids(prompts, prompt_token_ids)
        if sampling_params is None:
            params = [SamplingParams()] * len(prompt_ids)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompt_ids)
        else:
            params = list(sampling_params)
            if len(params) != len(prompt_ids):
                raise UserError(f"got {len(params)} sampling params for {len(prompt_ids)} prompts")
        reqs = [self._make_request(ids, p) for ids, p in zip(prompt_ids, params)]
        for r in reqs:
            self.scheduler.add(r)
        while any(r.status != Status.FINISHED for r in reqs):
            self.step()
        return [self._output(r) for r in reqs]

    def stats(self) -> dict:
        pool = self.runner.pool
        out = dict(self._counters)
        out.update(
            preemptions=self.scheduler.preemptions,
            kv_cache={"pages": pool.usable_pages, "free_pages": pool.free_pages, "page_size": pool.page_size,
                      "bytes": self.runner.kv_cache.nbytes()},
            eager_steps=dict(self.runner.eager_steps),
            decode=self.decode_runner.stats() if self.decode_runner else {"mode": "eager", "replays": 0,
                                                                        "rejects": {}, "captured": []},
            load_seconds=round(self.load_seconds, 3),
        )
        return out

    def shutdown(self) -> None:
        self.runner.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- one engine step ----------------------------------------------------------------------------------
    def step(self) -> None:
        sched = self.scheduler.schedule()
        if sched is None:
            raise RuntimeError("scheduler made no progress with requests pending")  # invariant, not user error
        batch = self.runner.make_batch(sched.mode, sched.token_ids, sched.prefix_lens,
                                       [r.pages for r in sched.requests])
        logits = self.runner.forward(batch)
        self._counters[f"{sched.mode.value}_steps"] += 1
        rows = [i for i, s in enumerate(sched.sample) if s]
        tokens = sample(logits[rows], [sched.requests[i].params for i in rows],
                        [sched.requests[i].generator for i in rows]) if rows else []
        for req, ids in zip(sched.requests, sched.token_ids):
            req.num_cached += len(ids)
        for i, tok in zip(rows, tokens):
            req = sched.requests[i]
            req.output_ids.append(tok)
            self._counters["generated_tokens"] += 1
            reason = self._finish_reason(req, tok)
            if reason is not None:
                self.scheduler.finish(req, reason)

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if tok in p.stop_token_ids:
            return "stop"
        if not p.ignore_eos and tok in self.model_config.eos_token_ids:
            return "stop"
        if len(req.output_ids) >= p.max_new_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- input handling -----------------------------------------------------------------------------------
    def _prompt_ids(self, prompts, prompt_token_ids) -> list[list[int]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise UserError("pass exactly one of prompts= or prompt_token_ids=")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if self.tokenizer is None:
                raise UserError(
                    f"model {self.config.model!r} has no tokenizer.json; pass prompt_token_ids instead of text"
                )
            ids = [self.tokenizer.encode(p) if isinstance(p, str) else _bad_prompt(p) for p in prompts]
        else:
            if isinstance(prompt_token_ids, (str, bytes)) or any(
                not isinstance(p, (list, tuple)) for p in prompt_token_ids
            ):
                raise UserError("prompt_token_ids must be a list of token-id lists, e.g. [[1, 2, 3]]")
            ids = [list(p) for p in prompt_token_ids]
        vocab = self.model_config.vocab_size
        for i, p in enumerate(ids):
            if not p:
                raise UserError(f"prompt {i} is empty")
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in p):
                raise UserError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
            if len(p) >= self.max_model_len:
                raise UserError(f"prompt {i} has {len(p)} tokens; the context holds at most {self.max_model_len - 1}")
        return ids

    def _make_request(self, ids: list[int], params: SamplingParams) -> Request:
        capacity = self.runner.pool.usable_pages * self.runner.pool.page_size
        need = min(len(ids) + params.max_new_tokens, self.max_model_len)
        if need > capacity:
            raise UserError(
                f"a request needs up to {need} tokens of KV cache but it holds {capacity}; raise kv_cache_tokens"
            )
        self._next_rid += 1
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self._counters["requests"] += 1
        self._counters["prompt_tokens"] += len(ids)
        return Request(rid=self._next_rid, prompt_ids=ids, params=params, generator=gen)

    def _output(self, req: Request) -> RequestOutput:
        text = self.tokenizer.decode(req.output_ids) if self.tokenizer else None
        return RequestOutput(req.prompt_ids, list(req.output_ids), text, req.finish_reason or "length")


def _bad_prompt(p) -> list[int]:
    raise UserError(f"text prompts must be strings, got {type(p).__name__}")


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
