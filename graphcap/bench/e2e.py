"""End-to-end generation: every contender (our eager, our graph modes, peers) on the same prompts, timed
round-robin so that machine noise lands on all of them alike."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from graphcap.bench.report import Row, make_row

NUM_REQUESTS = 16
PROMPT_LEN = 32
NEW_TOKENS = 64
SEED = 7


@dataclass
class Contender:
    """One way of generating: returns the new token ids per request (greedy, exactly NEW_TOKENS each)."""

    phase: str  # "e2e" for graphcap engines, "peer" for other frameworks
    mode: str
    generate: Callable[[list[list[int]]], list[list[int]]]


def make_prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (NUM_REQUESTS, PROMPT_LEN), generator=gen).tolist()


def llm_contender(mode: str, llm) -> Contender:
    from graphcap import SamplingParams

    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

    return Contender("e2e", mode, generate)


def e2e_rows(contenders: list[Contender], prompts: list[list[int]], iters: int) -> list[Row]:
    """A warm-up round (whose tokens are compared with the first contender's, our eager), then `iters`
    timed rounds, each running every contender once in turn."""
    outputs = [c.generate(prompts) for c in contenders]
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(iters):
        for c, ts in zip(contenders, times):
            t = time.perf_counter()
            c.generate(prompts)
            ts.append(time.perf_counter() - t)
    base_ms = statistics.median(times[0]) * 1e3
    rows = []
    for c, ts, out in zip(contenders, times, outputs):
        ms = statistics.median(ts) * 1e3
        # Counted, not assumed: a request that ended early (EOS not ignored) would inflate tokens/s.
        new_tokens = sum(len(o) for o in out)
        rows.append(make_row(c.phase, c.mode, len(prompts), ms, base_ms / ms, None, out == outputs[0],
                             tokens_per_s=new_tokens / (ms / 1e3), prompt_tokens=PROMPT_LEN, new_tokens=NEW_TOKENS,
                             generated_tokens=new_tokens, short_requests=sum(len(o) < NEW_TOKENS for o in out)))
    return rows
