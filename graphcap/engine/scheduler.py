"""Continuous batching: admit waiting requests into prefill batches within a token budget (chunking long
prompts), otherwise decode every running request; when pages run out, preempt the newest request and
recompute it later. Nothing is ever dropped."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from graphcap.engine.request import Request, Status
from graphcap.batch.forward_batch import ForwardMode
from graphcap.executor.kv_cache import PagePool


@dataclass
class ScheduledBatch:
    mode: ForwardMode
    requests: list[Request]
    token_ids: list[list[int]]
    prefix_lens: list[int]
    sample: list[bool]  # whether the request's last token of this step yields a new token


class Scheduler:
    def __init__(self, pool: PagePool, max_running_requests: int, max_prefill_tokens: int) -> None:
        self.pool = pool
        self.max_running = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> ScheduledBatch | None:
        """The next batch; when every running request is stuck mid-prefill without pages, the newest one
        is preempted so the others can proceed."""
        while True:
            batch = self._schedule_prefill() or self._schedule_decode()
            if batch is not None or not self.running:
                return batch
            self._preempt(max(self.running, key=lambda r: r.rid))

    def finish(self, req: Request, reason: str) -> None:
        """End a request, running or still waiting (a server aborts either), and give its pages back."""
        (self.running if req.status == Status.RUNNING else self.waiting).remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.pool.free(req.pages)
        req.pages = []

    # -- prefill ----------------------------------------------------------------------------------------
    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_prefill_tokens
        picked: list[tuple[Request, int]] = []
        candidates = [r for r in self.running if r.in_prefill] + list(self.waiting)
        slots = self.max_running - len(self.running)
        for req in candidates:
            if budget == 0:
                break
            is_new = req.status == Status.WAITING
            if is_new and slots == 0:
                break
            n = min(req.num_tokens - req.num_cached, budget)
            need = self.pool.pages_for(req.num_cached + n) - len(req.pages)
            pages = self.pool.alloc(need)
            if pages is None:
                break
            req.pages.extend(pages)
            if is_new:
                self.waiting.remove(req)
                req.status = Status.RUNNING
                self.running.append(req)
                slots -= 1
            picked.append((req, n))
            budget -= n
        if not picked:
            return None
        return ScheduledBatch(
            mode=ForwardMode.PREFILL,
            requests=[r for r, _ in picked],
            token_ids=[r.all_ids[r.num_cached : r.num_cached + n] for r, n in picked],
            prefix_lens=[r.num_cached for r, _ in picked],
            sample=[r.num_cached + n == r.num_tokens for r, n in picked],
        )

    # -- decode -----------------------------------------------------------------------------------------
    def _schedule_decode(self) -> ScheduledBatch | None:
        batch: list[Request] = []
        for req in sorted((r for r in self.running if not r.in_prefill), key=lambda r: r.rid):
            if req.status != Status.RUNNING:
                continue  # preempted while making room for an earlier request
            if not self._ensure_page_for_next_token(req):
                continue
            batch.append(req)
        if not batch:
            return None
        return ScheduledBatch(
            mode=ForwardMode.DECODE,
            requests=batch,
            token_ids=[[r.all_ids[-1]] for r in batch],
            prefix_lens=[r.num_cached for r in batch],
            sample=[True] * len(batch),
        )

    def _ensure_page_for_next_token(self, req: Request) -> bool:
        """Find a page for req's pending token, preempting newer requests; False if req itself was preempted."""
        need = self.pool.pages_for(req.num_tokens) - len(req.pages)
        while need > 0:
            pages = self.pool.alloc(need)
            if pages is not None:
                req.pages.extend(pages)
                return True
            victim = max(self.running, key=lambda r: r.rid)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.pool.free(req.pages)
        req.pages = []
        req.num_cached = 0
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
