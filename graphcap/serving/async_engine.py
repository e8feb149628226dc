"""The engine loop in its own thread, batching continuously while requests arrive and leave.

One thread owns the `LLM` (it builds it, steps it, aborts its requests, reads its stats and shuts it down):
nothing else ever calls into it. `EngineThread` is that thread's lifecycle, shared with the encoder engine
(embed_engine.py); `AsyncEngine` is the decoder's loop. The asyncio side talks to that thread through a thread-safe inbox (new
requests, aborts, calls such as `stats()`), drained between steps, and hears back through
`loop.call_soon_threadsafe`: after every step one callback hands each request's new tokens to its
`Submission`. If the loop dies, every pending request fails with the reason and `dead_reason` says why.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from graphcap.engine.request import Request, Status
from graphcap.engine.sampling_params import SamplingParams
from graphcap.errors import UserError

log = logging.getLogger("graphcap")

# How long the idle loop sleeps on an empty inbox before it looks at its stop flag again.
IDLE_POLL_S = 0.5


class EngineDeadError(RuntimeError):
    """The engine loop died (or never started); the message says why."""


class EngineNotReadyError(RuntimeError):
    """The engine is still starting (building the model, capturing graphs)."""


class QueueFullError(RuntimeError):
    """More requests would wait than --max-waiting allows."""


@dataclass(frozen=True)
class EngineInfo:
    """What the asyncio side may read without asking the engine thread: fixed once the LLM is built."""

    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int  # pages x page size: no request may need more
    max_running: int  # requests the scheduler runs at once
    tokenizer: Any  # graphcap.engine.tokenizer.Tokenizer (thread-safe: encode/decode only), or None
    chat_template: Any  # graphcap.engine.chat_template.ChatTemplate, or None
    chat_template_error: str | None
    chat_stop_ids: tuple[int, ...]  # tokens that end a chat turn (template's end tag, eos)
    eos_token_ids: tuple[int, ...]
    startup_seconds: float  # building the LLM, graph capture included


@dataclass(eq=False)
class _Job:
    """One engine request (one choice of an HTTP request)."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    submission: "Submission"
    req: Request | None = None
    sent: int = 0  # output tokens already handed to the submission
    started: bool = False  # left the waiting queue (the engine thread's view)
    counted_waiting: bool = True  # still counted in AsyncEngine.num_waiting (the asyncio thread's view)
    done: bool = False  # asyncio thread's view


@dataclass
class StepInfo:
    mode: str  # "prefill" or "decode"
    batch_size: int  # requests that got a token this step
    seconds: float


class Submission:
    """The engine requests behind one HTTP request (n choices, or several prompts); events arrive in order:

    ("ack", index, error)                         the engine took the request (error: a UserError's message)
    ("tokens", index, ids, finish_reason, t)      new tokens; finish_reason is set on the last event
    ("dead", message)                              the engine loop died
    """

    def __init__(self, engine: "AsyncEngine", loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._events: deque[tuple] = deque()
        self._waiter: asyncio.Future | None = None
        self.jobs: list[_Job] = []

    def _put(self, event: tuple) -> None:
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, deadline: float | None = None) -> tuple:
        """The next event; TimeoutError once `deadline` (loop.time()) passes."""
        while not self._events:
            self._waiter = self._loop.create_future()
            try:
                if deadline is None:
                    await self._waiter
                else:
                    async with asyncio.timeout_at(deadline):
                        await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    def get_nowait(self) -> tuple | None:
        return self._events.popleft() if self._events else None

    def abort(self, indices: Sequence[int] | None = None, reason: str = "abort") -> None:
        """Finish these choices (all by default) at the engine's next step; their pages go back."""
        jobs = [j for j in self.jobs if (indices is None or j.index in indices) and not j.done]
        for j in jobs:
            j.done = True
        if jobs:
            self._engine._abort(jobs, reason)


class EngineThread:
    """What both engines share: one thread owns the `LLM` (it builds it, runs it, answers calls into it and shuts
    it down) and talks to the asyncio side through a thread-safe inbox and `loop.call_soon_threadsafe`. A
    subclass says what the thread does between calls (`_run`), what the asyncio side may read once the LLM is
    built (`_make_info`), and how pending requests hear that the thread died (`_deliver_death`)."""

    thread_name = "graphcap-engine"

    def __init__(self, llm_factory: Callable[[], Any], *, max_waiting: int = 256,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
        self._factory = llm_factory
        self.max_waiting = max_waiting
        self._on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.dead_reason: str | None = None
        self.failed_at_startup = False
        self.startup_error: BaseException | None = None
        self.info: Any = None  # the subclass's info dataclass, set once the LLM is built
        self.num_waiting = 0  # accepted, not yet running (asyncio thread only): what --max-waiting bounds
        self.snapshot: dict = {}  # counts after the latest unit of work (replaced, never mutated)
        self.last_stats: dict | None = None  # llm.stats() as of the latest refresh_stats()
        self._llm = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is still running, stop the loop and shut the LLM down (on the engine thread)."""
        self._stopping.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
        if self._loop is not None and self.dead_reason is None:
            # A request that slipped in as the loop ended would otherwise wait forever.
            self._post(self._deliver_death, "the server shut down")

    @property
    def state(self) -> str:
        if self.dead_reason is not None:
            return "dead"
        if self._stopping.is_set():
            return "stopping"
        return "ready" if self.ready.is_set() else "starting"

    async def call(self, fn: Callable[[Any], Any], timeout: float = 5.0) -> Any:
        """Run fn(llm) on the engine thread between steps."""
        self._check_alive()
        fut = self._loop.create_future()
        self._inbox.put(("call", fn, fut))
        return await asyncio.wait_for(fut, timeout)

    async def refresh_stats(self, timeout: float = 2.0) -> dict | None:
        if self.state == "ready":
            try:
                self.last_stats = await self.call(lambda llm: llm.stats(), timeout)
            except (asyncio.TimeoutError, EngineDeadError, EngineNotReadyError):
                pass
        return self.last_stats

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._stopping.is_set():
            raise EngineDeadError("the server is shutting down")
        if not self.ready.is_set():
            raise EngineNotReadyError("the engine is still starting")

    def _post(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # -- hooks ------------------------------------------------------------------------------------------------
    def _make_info(self, llm, startup_seconds: float) -> Any:
        """On the engine thread, once the LLM is built; a UserError here is a start-up failure with status 2."""
        raise NotImplementedError

    def _run(self) -> None:
        """On the engine thread: serve until the stop flag is set."""
        raise NotImplementedError

    def _snapshot(self) -> None:
        """On the engine thread: publish the counts /health and /metrics show."""

    def _deliver_death(self, message: str) -> None:
        """On the asyncio thread: fail every pending request with `message`."""
        raise NotImplementedError

    # -- the engine thread -----------------------------------------------------------------------------------
    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            llm = self._factory()
            self._llm = llm
            self.info = self._make_info(llm, time.perf_counter() - t0)
            self._snapshot()
        except BaseException as e:  # noqa: BLE001 - any failure must reach the server, not vanish
            self.failed_at_startup = True
            self.startup_error = e
            self._die(f"the engine failed to start: {type(e).__name__}: {e}")
            if self._llm is not None:
                self._shutdown_llm()
            return
        self.ready.set()
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001
            log.exception("graphcap: the engine loop died")
            self._die(f"the engine loop died: {type(e).__name__}: {e}")
        finally:
            self._shutdown_llm()
            self.stopped.set()

    def _shutdown_llm(self) -> None:
        try:
            self._llm.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("graphcap: engine shutdown failed")

    def _answer_call(self, fn: Callable[[Any], Any], fut: asyncio.Future) -> None:
        try:
            result, error = fn(self._llm), None
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            result, error = None, e
        self._post(resolve_future, fut, result, error)

    def _die(self, message: str) -> None:
        self.dead_reason = message
        if self._loop is not None:
            self._post(self._deliver_death, message)
        # Calls waiting in the inbox would otherwise wait for their timeout.
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "call":
                self._post(resolve_future, item[2], None, EngineDeadError(message))
        self.stopped.set()


class AsyncEngine(EngineThread):
    """The decoder engine: continuous batching over `LLM.step`, each request's tokens handed back after every
    step."""

    def __init__(self, llm_factory: Callable[[], Any], *, max_waiting: int = 256,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
        super().__init__(llm_factory, max_waiting=max_waiting, on_step=on_step)
        self._submissions: set[Submission] = set()  # with jobs not yet done (asyncio thread only)
        self._active: dict[int, _Job] = {}  # id(job) -> job, engine thread only

    # -- the asyncio side ------------------------------------------------------------------------------------
    def submit(self, items: Sequence[tuple[list[int], SamplingParams]]) -> Submission:
        """Queue requests (one per (prompt ids, params)); raises EngineDeadError, EngineNotReadyError or
        QueueFullError at once instead of queueing."""
        self._check_alive()
        # Requests that will find a free batch slot at the next step do not wait: they count against the slots.
        free_slots = max(0, self.info.max_running - self.snapshot.get("running", 0))
        if self.num_waiting + len(items) > self.max_waiting + free_slots:
            raise QueueFullError(f"{self.num_waiting} requests are waiting for a batch slot already "
                                 f"(--max-waiting {self.max_waiting}); retry later")
        sub = Submission(self, self._loop)
        sub.jobs = [_Job(i, list(ids), params, sub) for i, (ids, params) in enumerate(items)]
        self.num_waiting += len(sub.jobs)
        self._submissions.add(sub)
        self._inbox.put(("add", sub.jobs))  # one item: the engine acks them all before any token
        return sub

    def _abort(self, jobs: list[_Job], reason: str) -> None:
        for job in jobs:
            self._uncount(job)
        if self.dead_reason is None:
            self._inbox.put(("abort", jobs, reason))

    def _uncount(self, job: _Job) -> None:
        if job.counted_waiting:
            job.counted_waiting = False
            self.num_waiting -= 1

    def _deliver(self, updates: list[tuple[_Job, list[int], str | None, bool]], t: float) -> None:
        """On the asyncio thread: one step's news for every request it touched."""
        for job, ids, finish, started in updates:
            if started or finish is not None:
                self._uncount(job)
            if finish is not None:
                job.done = True
                if all(j.done for j in job.submission.jobs):
                    self._submissions.discard(job.submission)
            job.submission._put(("tokens", job.index, ids, finish, t))

    def _deliver_acks(self, acks: list[tuple[_Job, str | None]]) -> None:
        for job, error in acks:
            if error is not None:
                self._uncount(job)
                job.done = True
            job.submission._put(("ack", job.index, error))

    def _deliver_death(self, message: str) -> None:
        for sub in list(self._submissions):
            for job in sub.jobs:
                self._uncount(job)
                job.done = True
            sub._put(("dead", message))
        self._submissions.clear()

    # -- the engine thread -----------------------------------------------------------------------------------
    def _make_info(self, llm, startup_seconds: float) -> "EngineInfo":
        return _engine_info(llm, startup_seconds)

    def _run(self) -> None:
        llm = self._llm
        sched = llm.scheduler
        while not self._stopping.is_set():
            busy = bool(sched.running or sched.waiting)
            self._drain(block=not busy)
            if self._stopping.is_set():
                break
            if sched.running or sched.waiting:
                self._step()
            self._snapshot()
        # Stopping: whatever the grace period left running ends here, its clients told "abort".
        self._drain(block=False)
        for job in list(self._active.values()):
            llm.abort_request(job.req, "abort")
        self._collect(time.monotonic())
        self._snapshot()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        acks: list[tuple[_Job, str | None]] = []
        aborted = False
        while True:
            kind = item[0]
            if kind == "add":
                for job in item[1]:
                    acks.append((job, self._add(job)))
            elif kind == "abort":
                _, jobs, reason = item
                for job in jobs:
                    if job.req is not None and id(job) in self._active:
                        self._llm.abort_request(job.req, reason)
                        aborted = True
            elif kind == "call":
                self._answer_call(item[1], item[2])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        if acks:
            self._post(self._deliver_acks, acks)
        if aborted:
            self._collect(time.monotonic())  # aborted requests hear about it now, not after the next step

    def _add(self, job: _Job) -> str | None:
        llm = self._llm
        try:
            ids = llm._prompt_ids(None, [job.prompt_ids])[0]
            job.req = llm._make_request(ids, job.params)
        except UserError as e:
            return str(e)
        llm.scheduler.add(job.req)
        self._active[id(job)] = job
        return None

    def _step(self) -> None:
        llm = self._llm
        decode_steps = llm._counters["decode_steps"]
        t0 = time.perf_counter()
        llm.step()
        seconds = time.perf_counter() - t0
        mode = "decode" if llm._counters["decode_steps"] != decode_steps else "prefill"
        sampled = self._collect(time.monotonic())
        if self._on_step is not None:
            self._on_step(StepInfo(mode, sampled, seconds))

    def _collect(self, t: float) -> int:
        """Hand every request's news since the last call to the asyncio side; returns how many got a token."""
        updates = []
        sampled = 0
        for key, job in list(self._active.items()):
            req = job.req
            n = len(req.output_ids)
            finished = req.status == Status.FINISHED
            started = not job.started and req.status != Status.WAITING
            if n > job.sent or finished or started:
                ids = req.output_ids[job.sent:n]
                sampled += bool(ids)
                job.sent = n
                job.started = job.started or started
                updates.append((job, ids, req.finish_reason if finished else None, started))
                if finished:
                    del self._active[key]
        if updates:
            self._post(self._deliver, updates, t)
        return sampled

    def _snapshot(self) -> None:
        llm = self._llm
        pool = llm.scheduler.pool
        self.snapshot = {"running": len(llm.scheduler.running), "waiting": len(llm.scheduler.waiting),
                         "kv_pages_total": pool.usable_pages, "kv_pages_used": pool.usable_pages - pool.free_pages,
                         "preemptions": llm.scheduler.preemptions}

    def _die(self, message: str) -> None:
        self._active.clear()
        super()._die(message)


def resolve_future(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """On the asyncio thread: settle `fut` unless its caller gave up on it (timed out, cancelled)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _engine_info(llm, startup_seconds: float) -> EngineInfo:
    if getattr(llm, "_embedder", None) is not None:
        raise UserError(f"{llm.config.model!r} is an encoder model: serve it with EmbedEngine, not AsyncEngine")
    template, template_error, stops = None, None, ()
    if llm.tokenizer is not None:
        try:
            template = llm._template()
            stops = tuple(llm._turn_end_ids(template))
        except UserError as e:
            template_error = str(e)
    else:
        template_error = f"model {llm.config.model!r} has no tokenizer, so no chat template"
    pool = llm.scheduler.pool
    return EngineInfo(
        max_model_len=llm.max_model_len, vocab_size=llm.model_config.vocab_size,
        kv_capacity_tokens=pool.usable_pages * pool.page_size, max_running=llm.scheduler.max_running,
        tokenizer=llm.tokenizer,
        chat_template=template, chat_template_error=template_error, chat_stop_ids=stops,
        eos_token_ids=tuple(llm.model_config.eos_token_ids), startup_seconds=startup_seconds,
    )

