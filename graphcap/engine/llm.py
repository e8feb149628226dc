"""The offline API: `LLM(model=...).generate(...)`, shaped like vLLM's so users know it on sight."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from graphcap.config import EngineConfig, config_from_kwargs
from graphcap.distributed.env import use_launched_ranks
from graphcap.engine.request import Request, RequestOutput, Status
from graphcap.engine.sampler import sample
from graphcap.engine.sampling_params import SamplingParams
from graphcap.engine.scheduler import Scheduler
from graphcap.engine.tokenizer import Tokenizer
from graphcap.errors import UserError
from graphcap.executor.kv_cache import num_pages_for
from graphcap.executor.loader import resolve_source
from graphcap.executor.setup import build_local_runner, kv_cache_tokens, max_model_len, resolve_device
from graphcap.executor.spmd_executor import SPMDExecutor
from graphcap.executor.tp_executor import TPExecutor

if TYPE_CHECKING:
    from graphcap.engine.chat_template import ChatTemplate

log = logging.getLogger("graphcap")

class LLM:
    _embedder = None  # set for encoder checkpoints (BERT, ViT): the engine is graphcap.engine.embedder
    _spmd: SPMDExecutor | None = None  # set when an external launcher (torchrun) started the TP ranks
    _rank = 0  # this process's rank in a launched TP group

    def __init__(self, model: str, **kwargs) -> None:
        self.config: EngineConfig = config_from_kwargs(model, kwargs)
        from graphcap.engine.embedder import is_encoder_checkpoint
        from graphcap.engine.tp_embedder import make_embedder

        if is_encoder_checkpoint(self.config.model):
            self._embedder = make_embedder(self.config)
            self._rank = self._embedder.rank
            return
        cfg = self.config
        source = resolve_source(cfg.model)
        self.model_config = source.config
        self.tokenizer = Tokenizer(source.tokenizer) if source.tokenizer else None
        self._chat_template: ChatTemplate | None = None
        self.max_model_len = max_model_len(cfg, source)
        t0 = time.perf_counter()
        if use_launched_ranks(cfg.tp_size):
            self.runner = self._spmd = SPMDExecutor(cfg, source)
            self._rank = self._spmd.rank
        elif cfg.tp_size > 1:
            self.runner = TPExecutor(cfg, num_pages_for(kv_cache_tokens(cfg, source, resolve_device(cfg)), cfg.page_size))
        else:
            self.runner = build_local_runner(cfg, source)
        self.startup_seconds = time.perf_counter() - t0
        self.load_seconds = self.runner.load_seconds
        self._say_ready()
        self.scheduler = Scheduler(self.runner.pool, cfg.max_running_requests, cfg.max_prefill_tokens)
        self._next_rid = 0
        self._counters = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "prefill_steps": 0,
                          "decode_steps": 0}

    # -- public API ---------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in the order given; requests are batched continuously."""
        if self._embedder is not None:
            raise UserError(f"{self.config.model!r} is an encoder model: it has no generate(); use embed()")
        prompt_ids = self._prompt_ids(prompts, prompt_token_ids)
        if sampling_params is None:
            params = [SamplingParams()] * len(prompt_ids)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompt_ids)
        else:
            params = list(sampling_params)
            if len(params) != len(prompt_ids):
                raise UserError(f"got {len(params)} sampling params for {len(prompt_ids)} prompts")
        # Launched ranks must sample alike: requests without a seed get one derived from rank 0's.
        shared_seed = self._spmd.agree_on_requests((prompt_ids, params)) if self._spmd is not None else None
        reqs = [self._make_request(ids, p, None if shared_seed is None else shared_seed + i)
                for i, (ids, p) in enumerate(zip(prompt_ids, params))]
        for r in reqs:
            self.scheduler.add(r)
        while any(r.status != Status.FINISHED for r in reqs):
            self.step()
        return [self._output(r) for r in reqs]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to several (a list of such
        lists), rendered with the checkpoint's own chat template. Generation also stops at the token that
        ends a turn in that template (for ChatML, "<|im_end|>")."""
        template = self._template()
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        if not conversations:
            raise UserError("chat() needs at least one conversation")
        texts = [template.render(conv, add_generation_prompt=add_generation_prompt) for conv in conversations]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        stop = self._turn_end_ids(template)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params: SamplingParams | list[SamplingParams] = self._with_stops(sampling_params or SamplingParams(),
                                                                              stop)
        else:
            params = [self._with_stops(p, stop) for p in sampling_params]
        return self.generate(prompt_token_ids=ids, sampling_params=params)

    def embed(self, texts: str | Sequence[str] | None = None, images=None) -> list[list[float]]:
        """One embedding per text (or image), in order. Text encoders give mean-pooled, L2-normalised vectors;
        ViT gives the final CLS vector. `images`: a [B, 3, H, W] tensor or a list of [3, H, W] tensors."""
        if self._embedder is None:
            raise UserError(f"{self.config.model!r} is a decoder model: it has no embed(); use generate()")
        return self._embedder.embed(texts=texts, images=images)

    @property
    def is_driver(self) -> bool:
        """False on ranks other than 0 of a torchrun launch, which compute the same outputs and should
        leave printing and saving them to rank 0."""
        return self._rank == 0

    def stats(self) -> dict:
        if self._embedder is not None:
            return self._embedder.stats()
        pool = self.runner.pool
        out = dict(self._counters)
        out.update(self.runner.stats())
        out["kv_cache"].update(pages=pool.usable_pages, free_pages=pool.free_pages, page_size=pool.page_size)
        out.update(preemptions=self.scheduler.preemptions, load_seconds=round(self.load_seconds, 3),
                   startup_seconds=round(self.startup_seconds, 3))
        out["startup"] = startup_breakdown(out)
        return out

    def shutdown(self) -> None:
        if self._embedder is not None:
            self._embedder.shutdown()
        else:
            self.runner.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _say_ready(self) -> None:
        """Graph capture takes seconds to minutes; one line on stderr says where the time went, and whether
        the graph cache made it a warm start."""
        stats = self.runner.stats()
        if self._rank != 0 or all(stats.get(p, {}).get("mode", "eager") == "eager" for p in ("decode", "prefill")):
            return
        s = startup_breakdown({**stats, "load_seconds": self.load_seconds, "startup_seconds": self.startup_seconds})
        cache = "graph cache off" if s["cache"] == "off" else (
            f"{s['cache']} start: {s['cache_hits']} buckets restored, {s['cache_misses']} captured")
        print(f"graphcap: ready in {s['seconds']:.1f} s, {cache} (load {s['load']:.1f}, kernel build "
              f"{s['kernel_build']:.1f}, compile {s['compile']:.1f}, capture {s['capture']:.1f}, verify "
              f"{s['verify']:.1f}, timing {s['timing']:.1f}, restore {s['restore']:.1f})", file=sys.stderr)

    def _template(self) -> ChatTemplate:
        if self._embedder is not None:
            raise UserError(f"{self.config.model!r} is an encoder model: it has no chat(); use embed()")
        if self._chat_template is None:
            from graphcap.engine.chat_template import ChatTemplate

            src = self.tokenizer.source if self.tokenizer is not None else None
            if src is None or src.chat_template is None:
                raise UserError(f"model {self.config.model!r} has no chat template; use generate() with a prompt")
            self._chat_template = ChatTemplate(src.chat_template, src.bos_token, src.eos_token)
        return self._chat_template

    def _turn_end_ids(self, template: ChatTemplate) -> list[int]:
        ids = [self.tokenizer.token_id(t) for t in (template.end_token, self.tokenizer.source.eos_token) if t]
        return sorted({i for i in ids if i is not None})

    @staticmethod
    def _with_stops(params: SamplingParams, stop: list[int]) -> SamplingParams:
        extra = [t for t in stop if t not in params.stop_token_ids]
        return dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *extra]) if extra else params

    # -- one engine step ----------------------------------------------------------------------------------
    def step(self) -> None:
        sched = self.scheduler.schedule()
        if sched is None:
            raise RuntimeError("scheduler made no progress with requests pending")  # invariant, not user error
        logits = self.runner.execute(sched.mode, sched.token_ids, sched.prefix_lens, [r.pages for r in sched.requests])
        self._counters[f"{sched.mode.value}_steps"] += 1
        rows = [i for i, s in enumerate(sched.sample) if s]
        # Every row samples in a decode step; copying [B, vocab] logits to select them all would cost
        # as much as the sampling itself on a large vocabulary.
        picked = logits if len(rows) == logits.shape[0] else logits[rows]
        tokens = sample(picked, [sched.requests[i].params for i in rows],
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

    def abort_request(self, req: Request, reason: str = "abort") -> None:
        """Finish `req` now, waiting or running, and give its KV pages back (the server calls this between
        steps when a client goes away, a stop string matches or a request times out)."""
        if req.status != Status.FINISHED:
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
                    f"model {self.config.model!r} has no tokenizer; pass prompt_token_ids instead of text"
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

    def _make_request(self, ids: list[int], params: SamplingParams, default_seed: int | None = None) -> Request:
        capacity = self.runner.pool.usable_pages * self.runner.pool.page_size
        need = min(len(ids) + params.max_new_tokens, self.max_model_len)
        if need > capacity:
            raise UserError(
                f"a request needs up to {need} tokens of KV cache but it holds {capacity}; raise kv_cache_tokens"
            )
        self._next_rid += 1
        seed = params.seed if params.seed is not None else default_seed
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self._counters["requests"] += 1
        self._counters["prompt_tokens"] += len(ids)
        return Request(rid=self._next_rid, prompt_ids=ids, params=params, generator=gen)

    def _output(self, req: Request) -> RequestOutput:
        text = self.tokenizer.decode(req.output_ids) if self.tokenizer else None
        return RequestOutput(req.prompt_ids, list(req.output_ids), text, req.finish_reason or "length")


def startup_breakdown(stats: dict) -> dict:
    """Seconds of start-up by kind: loading weights, building the C++ kernels, compiling graphs, capturing them
    (all of it: compiling, verifying against float64, timing against eager, restoring), and restoring them
    from the graph cache (loading and checking them, and the cache's own reads and writes); whether the cache
    made it a warm start (every bucket restored), a cold one (none), a partial one, or was off; and how many
    buckets it restored (hits) and how many were captured instead (misses)."""
    phases = [stats.get(p) or {} for p in ("decode", "prefill")]
    cache = stats.get("graph_cache") or {}
    hits = sum((p.get("cache") or {}).get("hits", 0) for p in phases)
    misses = sum(sum((p.get("cache") or {}).get("misses", {}).values()) for p in phases)
    if not cache.get("enabled"):
        state = "off"
    else:
        state = "warm" if not misses else "cold" if not hits else "partial"
    return {
        "seconds": round(stats.get("startup_seconds", 0.0), 3),
        "load": round(stats.get("load_seconds", 0.0), 3),
        "kernel_build": round(stats.get("kernel_build_seconds", 0.0), 3),
        **{kind: round(sum(p.get(f"{kind}_seconds", 0.0) for p in phases), 3) for kind in ("compile", "capture",
                                                                                            "verify", "timing")},
        "restore": round(sum(p.get("restore_seconds", 0.0) for p in phases) + cache.get("seconds", 0.0), 3),
        "cache": state,
        "cache_hits": hits,
        "cache_misses": misses,
    }


def _bad_prompt(p) -> list[int]:
    raise UserError(f"text prompts must be strings, got {type(p).__name__}")

