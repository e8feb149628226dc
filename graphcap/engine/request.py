"""A request's life: its tokens, its pages in the KV cache, and how it finished."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from graphcap.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """True while some known tokens are not yet in the cache (new, chunked or preempted requests)."""
        return self.num_cached < self.num_tokens - 1 or not self.output_ids and self.num_cached < self.num_tokens


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt, in prompt order."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
