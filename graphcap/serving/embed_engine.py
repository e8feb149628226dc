"""The encoder engine behind /v1/embeddings: one thread owns an encoder `LLM` and batches across requests.

An encoder forward has no steps to interleave, so the thread runs one batch at a time: every request that
arrived while the previous forward ran goes into the next one (up to `MAX_BATCH_INPUTS` inputs), where
`Embedder` sorts the inputs by length and cuts them into its buckets as `LLM.embed` would. Concurrent requests
thus share forwards instead of queueing behind each other one by one, and the event loop never waits on a
forward (torch releases the GIL while it computes).
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from graphcap.errors import UserError
from graphcap.serving.async_engine import (
    IDLE_POLL_S,
    EngineDeadError,
    EngineThread,
    QueueFullError,
    StepInfo,
    resolve_future,
)

# Inputs one forward takes from the queue at most: a huge request still runs whole, but requests behind it do
# not all pile into one forward whose latency every one of them would pay.
MAX_BATCH_INPUTS = 256


@dataclass(frozen=True)
class EncoderInfo:
    """What the asyncio side may read without asking the engine thread: fixed once the encoder is built."""

    max_model_len: int  # tokens per input; longer texts are truncated (as `LLM.embed` does)
    vocab_size: int
    dimensions: int  # length of every embedding
    takes_token_ids: bool  # token-id inputs need the encoder in this process (not spawned TP ranks)
    startup_seconds: float


@dataclass(eq=False)
class _EmbedJob:
    """One HTTP request: its inputs are texts, or token-id lists (never both)."""

    texts: list[str] | None
    token_ids: list[list[int]] | None
    future: asyncio.Future
    counted_waiting: bool = True  # still counted in num_waiting (asyncio thread only)
    abandoned: bool = False  # the request timed out: the engine thread skips it if it has not started it

    @property
    def size(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


@dataclass
class _Batch:
    jobs: list[_EmbedJob] = field(default_factory=list)
    inputs: int = 0


class EmbedEngine(EngineThread):
    """The encoder engine: `embed()` queues one request's inputs; the engine thread runs what has queued up as
    one batch and hands each request its vectors and token count."""

    thread_name = "graphcap-encoder"

    def __init__(self, llm_factory: Callable[[], Any], *, max_waiting: int = 256,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
        super().__init__(llm_factory, max_waiting=max_waiting, on_step=on_step)
        self._jobs: set[_EmbedJob] = set()  # accepted and not answered (asyncio thread only)
        self._tokenizer = None  # engine thread only: counts the tokens of text inputs

    # -- the asyncio side ------------------------------------------------------------------------------------
    async def embed(self, texts: list[str] | None = None, token_ids: list[list[int]] | None = None,
                    timeout: float | None = None) -> tuple[list[list[float]], int]:
        """One embedding per input, in order, and the number of tokens the encoder read. Raises
        EngineDeadError, EngineNotReadyError or QueueFullError at once instead of queueing, TimeoutError after
        `timeout` seconds, UserError for inputs the encoder refuses."""
        self._check_alive()
        if self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"{self.num_waiting} requests are waiting for the encoder already "
                                 f"(--max-waiting {self.max_waiting}); retry later")
        job = _EmbedJob(texts, token_ids, self._loop.create_future())
        self.num_waiting += 1
        self._jobs.add(job)
        self._inbox.put(("embed", job))
        try:
            async with asyncio.timeout(timeout):
                return await job.future
        except TimeoutError:
            job.abandoned = True
            raise
        finally:
            self._uncount(job)
            self._jobs.discard(job)

    def _uncount(self, job: _EmbedJob) -> None:
        if job.counted_waiting:
            job.counted_waiting = False
            self.num_waiting -= 1

    def _started(self, jobs: list[_EmbedJob]) -> None:
        for job in jobs:
            self._uncount(job)

    def _deliver_death(self, message: str) -> None:
        for job in list(self._jobs):
            resolve_future(job.future, None, EngineDeadError(message))
        self._jobs.clear()

    # -- the engine thread -----------------------------------------------------------------------------------
    def _make_info(self, llm, startup_seconds: float) -> EncoderInfo:
        from graphcap.engine.embedder import Embedder
        from graphcap.executor.encoder_loader import load_tokenizer, resolve_encoder_source

        embedder = llm._embedder
        if embedder is None:
            raise UserError(f"{llm.config.model!r} is a decoder model: serve it with AsyncEngine, not EmbedEngine")
        if not embedder.inputs.takes_texts:
            raise UserError(f"{llm.config.model!r} is an image encoder; /v1/embeddings takes text only")
        source = resolve_encoder_source(llm.config.model)
        in_process = isinstance(embedder, Embedder)
        if in_process:
            self._tokenizer = embedder.tokenizer
        else:  # the ranks hold the encoder's tokenizer; this one only counts tokens, the same way
            self._tokenizer = load_tokenizer(source.tokenizer_path, source.max_length,
                                             int(source.hf_config.get("pad_token_id") or 0))
            self._tokenizer.no_padding()
        hf = source.hf_config
        return EncoderInfo(max_model_len=source.max_length, vocab_size=int(hf["vocab_size"]),
                           dimensions=int(hf["hidden_size"]), takes_token_ids=in_process,
                           startup_seconds=startup_seconds)

    def _snapshot(self, running: int = 0, waiting: int = 0) -> None:
        self.snapshot = {"running": running, "waiting": waiting}

    def _run(self) -> None:
        waiting: deque[_EmbedJob] = deque()
        while not self._stopping.is_set():
            self._drain(waiting, block=not waiting)
            if self._stopping.is_set():
                break
            batch = _Batch()
            while waiting and (not batch.jobs or batch.inputs + waiting[0].size <= MAX_BATCH_INPUTS):
                job = waiting.popleft()
                if not job.abandoned:
                    batch.jobs.append(job)
                    batch.inputs += job.size
            if batch.jobs:
                self._post(self._started, batch.jobs)
                self._snapshot(batch.inputs, len(waiting))
                self._forward(batch)
            self._snapshot(0, len(waiting))

    def _drain(self, waiting: deque[_EmbedJob], block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "embed":
                waiting.append(item[1])
            elif item[0] == "call":
                self._answer_call(item[1], item[2])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _forward(self, batch: _Batch) -> None:
        """Texts of every job in one `embed` call, token ids in another; each job gets its share back. A
        UserError fails this batch's requests only; anything else ends the loop (and every request)."""
        t0 = time.perf_counter()
        results: dict[int, tuple[list[list[float]], int]] = {}
        try:
            for kind in ("texts", "token_ids"):
                jobs = [j for j in batch.jobs if getattr(j, kind) is not None]
                if not jobs:
                    continue
                inputs = [x for j in jobs for x in getattr(j, kind)]
                if kind == "texts":
                    vectors = self._llm.embed(texts=inputs)
                    lengths = [len(e.ids) for e in self._tokenizer.encode_batch(inputs)]
                else:
                    vectors = embed_token_ids(self._llm._embedder, inputs)
                    lengths = [len(ids) for ids in inputs]
                start = 0
                for j in jobs:
                    end = start + j.size
                    results[id(j)] = (vectors[start:end], sum(lengths[start:end]))
                    start = end
        except UserError as e:
            for j in batch.jobs:
                self._post(resolve_future, j.future, None, e)
            return
        seconds = time.perf_counter() - t0
        for j in batch.jobs:
            self._post(resolve_future, j.future, results[id(j)], None)
        if self._on_step is not None:
            self._on_step(StepInfo("encoder", batch.inputs, seconds))


@torch.inference_mode()
def embed_token_ids(embedder, token_ids: list[list[int]]) -> list[list[float]]:
    """`Embedder.embed` for inputs already tokenised (it takes texts only): the same length-sorted chunks,
    zero padding, attention mask and runners (graph or eager), on the ids as given ([CLS] and [SEP] included
    if the client wants them, as the tokenizer would add them)."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out: list[list[float] | None] = [None] * len(token_ids)
    for chunk in embedder._chunks(order, [len(token_ids[i]) for i in order]):
        width = max(len(token_ids[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
            mask[row, : len(token_ids[i])] = 1
        emb = embedder._run(len(chunk), width, ids.to(embedder.device), mask.to(embedder.device))
        embedder._counters["tokens"] += int(mask.sum())
        for row, vector in zip(chunk, emb.float().cpu().tolist()):
            out[row] = vector
    embedder._counters["inputs"] += len(token_ids)
    return out  # type: ignore[return-value]

