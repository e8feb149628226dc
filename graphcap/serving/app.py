"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models, plus
/health and /metrics. A decoder's tokens come from the AsyncEngine; text comes out through an incremental
detokenizer, so a stream never carries half a character and stop strings are cut out across token
boundaries. An encoder's vectors come from the EmbedEngine. Each kind of model answers the other kind's
endpoints with a 400 that says which endpoint it serves."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import struct
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from graphcap.engine.sampling_params import SamplingParams
from graphcap.errors import UserError
from graphcap.serving.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineNotReadyError,
    EngineThread,
    QueueFullError,
)
from graphcap.serving.detokenizer import IncrementalDetokenizer
from graphcap.serving.embed_engine import EmbedEngine
from graphcap.serving.metrics import ServerMetrics
from graphcap.serving.protocol import (
    APIError,
    GenerationRequest,
    bad,
    error_body,
    parse_chat,
    parse_completion,
    parse_embedding,
    prompt_token_lists,
)

log = logging.getLogger("graphcap")

COMPLETIONS_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
RETRY_AFTER_S = 1
COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    request_timeout: float | None = None  # seconds from arrival to the last token; None: no limit
    stop_timeout: float = 30.0  # how long lifespan shutdown waits for the engine thread to end
    on_ready: Callable[[], None] | None = None  # the engine is built (called on the event loop)
    on_startup_failure: Callable[[EngineThread], None] | None = None


class _Draining:
    value = False


def build_app(engine: AsyncEngine | EmbedEngine, settings: ServerSettings,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """The app over a decoder engine (AsyncEngine: completions, chat) or an encoder engine (EmbedEngine:
    embeddings); /v1/models, /health and /metrics work for both."""
    metrics = metrics or ServerMetrics(engine, settings.model_name)
    draining = _Draining()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        watcher = asyncio.create_task(_watch_startup(engine, settings))
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(engine.stop, settings.stop_timeout)

    app = FastAPI(title="graphcap", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.draining = draining
    api = _API(engine, settings, metrics, draining)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("graphcap: internal error")
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "server_error",
                                       code="internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        state = "draining" if draining.value and engine.state == "ready" else engine.state
        body: dict[str, Any] = {"status": state}
        if engine.dead_reason is not None:
            body["reason"] = engine.dead_reason
        body.update(engine.snapshot)
        body["waiting_admission"] = engine.num_waiting
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        await engine.refresh_stats()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        api.check_auth(request)
        card: dict[str, Any] = {"id": settings.model_name, "object": "model", "created": api.created,
                                "owned_by": "graphcap"}
        if engine.info is not None:
            card["max_model_len"] = engine.info.max_model_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.chat(request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await api.embeddings(request)

    return _CountRequests(app, metrics)


async def _watch_startup(engine: EngineThread, settings: ServerSettings) -> None:
    while not engine.ready.is_set() and engine.dead_reason is None:
        await asyncio.sleep(0.05)
    if engine.ready.is_set():
        if settings.on_ready is not None:
            settings.on_ready()
    elif settings.on_startup_failure is not None:
        settings.on_startup_failure(engine)


class _CountRequests:
    """Counts API requests by endpoint and status code (a plain ASGI wrapper: BaseHTTPMiddleware would get in
    the way of streaming and of noticing disconnects). Attributes not its own reach the FastAPI app."""

    def __init__(self, app: FastAPI, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") not in COUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        status = None

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(scope["path"], str(status or 500)).inc()


@dataclass
class _Choice:
    index: int
    prompt_index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    token_ids: list[int]
    finish: str | None = None
    first_t: float | None = None
    last_t: float | None = None


class _API:
    def __init__(self, engine: AsyncEngine | EmbedEngine, settings: ServerSettings, metrics: ServerMetrics,
                 draining: _Draining) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.draining = draining
        self.created = int(time.time())

    # -- checks -------------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_engine(self) -> None:
        if self.engine.dead_reason is not None:
            raise APIError(500, self.engine.dead_reason, "server_error", code="engine_dead")
        if self.draining.value:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        if not self.engine.ready.is_set():
            raise APIError(503, "the engine is still starting; retry when /health says ready", "server_error",
                           code="starting", headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_endpoint(self, endpoint: str) -> None:
        """Encoders serve /v1/embeddings only, decoders everything else: known before the engine is built."""
        name = self.settings.model_name
        if isinstance(self.engine, EmbedEngine) and endpoint != "/v1/embeddings":
            raise bad(f"the model {name!r} is an encoder (embeddings): it does not generate text, so it does not "
                      f"serve {endpoint}; use /v1/embeddings", "model", "unsupported_endpoint")
        if not isinstance(self.engine, EmbedEngine) and endpoint == "/v1/embeddings":
            raise bad(f"the model {name!r} is a decoder (text generation): it does not serve /v1/embeddings; use "
                      f"/v1/completions or /v1/chat/completions, or serve an encoder such as minilm",
                      "model", "unsupported_endpoint")

    async def _body(self, request: Request, endpoint: str) -> Any:
        self.check_auth(request)
        self.check_endpoint(endpoint)
        self.check_engine()
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None

    def _check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise APIError(400, f"the model {model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")

    # -- endpoints ----------------------------------------------------------------------------------------
    async def completions(self, request: Request):
        t_arrival = time.monotonic()
        body = await self._body(request, "/v1/completions")
        gen, prompt = parse_completion(body)
        self._check_model(gen.model)
        info = self.engine.info
        prompts = prompt_token_lists(prompt, lambda text: info.tokenizer.encode(text), info.tokenizer is not None)
        return await self._generate(request, "completion", gen, prompts, [], t_arrival)

    async def chat(self, request: Request):
        t_arrival = time.monotonic()
        body = await self._body(request, "/v1/chat/completions")
        gen, messages = parse_chat(body)
        self._check_model(gen.model)
        info = self.engine.info
        if info.chat_template is None:
            raise bad(f"this model has no chat template ({info.chat_template_error}); use /v1/completions",
                      code="no_chat_template")
        try:
            text = info.chat_template.render(messages, add_generation_prompt=True)
        except UserError as e:
            raise bad(str(e), "messages") from None
        ids = info.tokenizer.encode(text, add_special_tokens=False)
        return await self._generate(request, "chat", gen, [ids], list(info.chat_stop_ids), t_arrival)

    async def embeddings(self, request: Request) -> Response:
        t_arrival = time.monotonic()
        body = await self._body(request, "/v1/embeddings")
        req = parse_embedding(body)
        self._check_model(req.model)
        info = self.engine.info
        if req.dimensions is not None and req.dimensions != info.dimensions:
            raise bad(f"this model's embeddings have {info.dimensions} dimensions and cannot be shortened; got "
                      f"'dimensions': {req.dimensions}", "dimensions", "unsupported_parameter")
        if req.token_ids is not None:
            if not info.takes_token_ids:
                raise bad("token-id input needs the encoder in the server's process (--tp 1); send text",
                          "input", "unsupported_parameter")
            for i, ids in enumerate(req.token_ids):
                if any(t < 0 or t >= info.vocab_size for t in ids):
                    raise bad(f"input {i} has token ids outside the vocabulary [0, {info.vocab_size})", "input")
                if len(ids) > info.max_model_len:
                    raise bad(f"this model's maximum input length is {info.max_model_len} tokens, but input {i} "
                              f"has {len(ids)}", "input", "context_length_exceeded")
        try:
            with self._refusals():
                vectors, tokens = await self.engine.embed(req.texts, req.token_ids, self.settings.request_timeout)
        except TimeoutError:
            raise APIError(408, f"the request took longer than --request-timeout "
                                f"({self.settings.request_timeout:g} s)", "timeout_error", code="timeout") from None
        except UserError as e:
            raise bad(str(e), "input") from None
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.e2e.observe(time.monotonic() - t_arrival)
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64_floats(v) if req.encoding_format == "base64" else v}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": self.settings.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """An engine that will not take a request, as HTTP: 429 (queue full), 500 (dead), 503 (still starting)."""
        try:
            yield
        except QueueFullError as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineDeadError as e:
            raise APIError(500, str(e), "server_error", code="engine_dead") from None
        except EngineNotReadyError as e:
            raise APIError(503, str(e), "server_error", code="starting",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    # -- generation ---------------------------------------------------------------------------------------
    def _sampling(self, gen: GenerationRequest, kind: str, prompts: list[list[int]],
                  extra_stops: list[int]) -> list[list[SamplingParams]]:
        """Per prompt, per choice: checked against the context and the KV cache like LLM.generate would."""
        info = self.engine.info
        out = []
        for i, ids in enumerate(prompts):
            where = "prompt" if kind == "completion" else "messages"
            if not ids:
                raise bad(f"prompt {i} is empty", where)
            if any(t < 0 or t >= info.vocab_size for t in ids):
                raise bad(f"prompt {i} has token ids outside the vocabulary [0, {info.vocab_size})", where)
            room = min(info.max_model_len, info.kv_capacity_tokens) - len(ids)
            if len(ids) >= info.max_model_len:
                raise bad(f"this model's maximum context length is {info.max_model_len} tokens, but the prompt "
                          f"has {len(ids)}", where, "context_length_exceeded")
            if room < 1:
                raise bad(f"the prompt has {len(ids)} tokens but the KV cache holds {info.kv_capacity_tokens}",
                          where, "context_length_exceeded")
            if gen.max_tokens is None:
                max_tokens = min(room, COMPLETIONS_MAX_TOKENS_DEFAULT) if kind == "completion" else room
            elif len(ids) + gen.max_tokens > info.max_model_len:
                raise bad(f"this model's maximum context length is {info.max_model_len} tokens; you asked for "
                          f"{len(ids) + gen.max_tokens} ({len(ids)} in the prompt, {gen.max_tokens} to generate)",
                          "max_tokens", "context_length_exceeded")
            elif gen.max_tokens > room:
                raise bad(f"the request needs up to {len(ids) + gen.max_tokens} tokens of KV cache but it holds "
                          f"{info.kv_capacity_tokens}", "max_tokens", "context_length_exceeded")
            else:
                max_tokens = gen.max_tokens
            stops = list(dict.fromkeys([*gen.stop_token_ids, *extra_stops]))
            row = []
            for j in range(gen.n):
                seed = None if gen.seed is None else gen.seed + j
                try:
                    row.append(SamplingParams(max_new_tokens=max_tokens, temperature=gen.temperature, top_k=gen.top_k,
                                              top_p=gen.top_p, seed=seed, stop_token_ids=stops,
                                              ignore_eos=gen.ignore_eos))
                except UserError as e:
                    raise bad(str(e)) from None
            out.append(row)
        return out

    async def _generate(self, request: Request, kind: str, gen: GenerationRequest, prompts: list[list[int]],
                        extra_stops: list[int], t_arrival: float):
        params = self._sampling(gen, kind, prompts, extra_stops)
        items = [(ids, p) for ids, row in zip(prompts, params) for p in row]
        with self._refusals():
            sub = self.engine.submit(items)
        tokenizer = self.engine.info.tokenizer
        decode = tokenizer.decode if tokenizer is not None else (lambda ids: "")
        choices = [_Choice(i * gen.n + j, i, p, IncrementalDetokenizer(decode, gen.stop), [])
                   for i, row in enumerate(params) for j, p in enumerate(row)]
        timeout = self.settings.request_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout \
            - (time.monotonic() - t_arrival)
        run = _Run(self, sub, choices, kind, gen, prompts, t_arrival, deadline)
        try:
            await run.wait_acks()
        except TimeoutError:
            sub.abort()
            raise APIError(408, f"the request took longer than --request-timeout ({timeout:g} s)", "timeout_error",
                           code="timeout") from None
        except EngineDeadError as e:
            raise APIError(500, str(e), "server_error", code="engine_dead") from None
        except BaseException:
            sub.abort()
            raise
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        if gen.stream:
            return _SSEResponse(run.stream(), run.close, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.collect(request)


class _SSEResponse(StreamingResponse):
    """Closes its stream however the response ends (even one the client left before it began), so an abandoned
    stream's requests are aborted now rather than run to the end."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._on_close()


class _Run:
    """One HTTP request's choices, from the engine's events to OpenAI's response or stream."""

    def __init__(self, api: _API, sub, choices: list[_Choice], kind: str, gen: GenerationRequest,
                 prompts: list[list[int]], t_arrival: float, deadline: float | None) -> None:
        self.api, self.sub, self.choices, self.kind, self.gen = api, sub, choices, kind, gen
        self.prompts, self.t_arrival, self.deadline = prompts, t_arrival, deadline
        self.metrics = api.metrics
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = api.settings.model_name
        self.complete = False  # the response went out whole

    def close(self) -> None:
        if not self.complete:  # the client went away (or the server is stopping): free the engine's pages now
            self._fail_remaining("disconnect")

    @property
    def pending(self) -> bool:
        return any(c.finish is None for c in self.choices)

    async def wait_acks(self) -> None:
        acked = 0
        errors = []
        while acked < len(self.choices):
            event = await self._get()
            if event[0] == "ack":
                acked += 1
                if event[2] is not None:
                    errors.append(event[2])
        if errors:
            raise bad(errors[0], "prompt" if self.kind == "completion" else "messages")

    async def _get(self) -> tuple:
        event = await self.sub.get(self.deadline)
        if event[0] == "dead":
            raise EngineDeadError(event[1])
        return event

    def apply(self, event: tuple) -> tuple[_Choice, str, list[int]] | None:
        """Feed one event to its choice; (choice, new text, new token ids) to report, or None."""
        if event[0] != "tokens":
            return None
        _, index, ids, finish, t = event
        c = self.choices[index]
        if c.finish is not None:
            return None  # ended by a stop string already: these tokens were generated past it
        taken = []
        for k, tok in enumerate(ids):
            stop_token = finish == "stop" and k == len(ids) - 1  # the engine stopped on it: its text stays out
            c.detok.add(tok, count_only=stop_token)
            taken.append(tok)
            if c.first_t is None:
                c.first_t = t
                self.metrics.ttft.observe(max(0.0, t - self.t_arrival))
            elif c.last_t is not None:
                self.metrics.itl.observe(max(0.0, t - c.last_t))
            c.last_t = t
            if c.detok.stopped:
                break
        c.token_ids.extend(taken)
        self.metrics.generation_tokens.inc(len(taken))
        if c.detok.stopped:
            finish = "stop"
            self.sub.abort([c.index], "stop")
        elif finish is not None:
            c.detok.flush()
        if finish is not None:
            c.finish = finish
            self.metrics.finished.labels(finish).inc()
            if c.first_t is not None:
                self.metrics.e2e.observe(max(0.0, c.last_t - self.t_arrival))
        return c, c.detok.delta(final=finish is not None), taken

    def _fail_remaining(self, reason: str) -> None:
        for c in self.choices:
            if c.finish is None:
                c.finish = reason
                self.metrics.finished.labels(reason).inc()
        self.sub.abort()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.detok.num_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- non-streaming ------------------------------------------------------------------------------------
    async def collect(self, request: Request):
        async def consume() -> None:
            while self.pending:
                self.apply(await self._get())

        task = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: the server is stopping and its grace period is over
            self._fail_remaining("abort")
            raise
        finally:
            if not task.done():
                task.cancel()
            gone.cancel()
        if not task.done() or task.cancelled():
            self._fail_remaining("disconnect")
            return Response(status_code=499)
        error = task.exception()
        if isinstance(error, TimeoutError):
            self._fail_remaining("timeout")
            raise APIError(408, f"the request took longer than --request-timeout "
                                f"({self.api.settings.request_timeout:g} s)", "timeout_error", code="timeout")
        if isinstance(error, EngineDeadError):
            self._fail_remaining("error")
            raise APIError(500, str(error), "server_error", code="engine_dead")
        if error is not None:
            self._fail_remaining("error")
            raise error
        return self.response()

    def _final_text(self, c: _Choice) -> str:
        tok = self.api.engine.info.tokenizer
        if c.detok.stopped or tok is None:
            return c.detok.text
        ids = c.token_ids[:-1] if c.finish == "stop" and c.token_ids else c.token_ids
        return tok.decode(ids)

    def response(self) -> dict:
        choices = []
        for c in self.choices:
            text = self._final_text(c)
            if self.kind == "completion":
                choice: dict[str, Any] = {"index": c.index, "text": text, "logprobs": None,
                                          "finish_reason": c.finish}
            else:
                choice = {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": c.finish}
            if self.gen.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}

    # -- streaming ----------------------------------------------------------------------------------------
    def _chunk(self, choice: dict) -> bytes:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        data: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "choices": [choice]}
        if self.gen.include_usage:
            data["usage"] = None
        return _sse(data)

    def _choice_chunk(self, c: _Choice, text: str | None, finish: str | None, ids: list[int] | None,
                      role: bool = False) -> bytes:
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": c.index, "text": text or "", "logprobs": None, "finish_reason": finish}
        else:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
        if self.gen.return_token_ids and ids is not None:
            choice["token_ids"] = ids
        return self._chunk(choice)

    def _events_now(self, first: tuple) -> dict[int, tuple[_Choice, str, list[int]]]:
        """`first` and every event already queued behind it, merged per choice: a stream that fell behind the
        engine catches up in one chunk per choice instead of one per token."""
        merged: dict[int, tuple[_Choice, str, list[int]]] = {}
        event: tuple | None = first
        while event is not None:
            if event[0] == "dead":
                raise EngineDeadError(event[1])
            news = self.apply(event)
            if news is not None:
                c, text, ids = news
                _, text0, ids0 = merged.get(c.index, (c, "", []))
                merged[c.index] = (c, text0 + text, ids0 + ids)
            event = self.sub.get_nowait()
        return merged

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            if self.kind == "chat":
                for c in self.choices:
                    yield self._choice_chunk(c, "", None, None, role=True)
            while self.pending:
                try:
                    news = self._events_now(await self._get())
                except TimeoutError:
                    self._fail_remaining("timeout")
                    yield _sse(error_body(f"the request took longer than --request-timeout "
                                          f"({self.api.settings.request_timeout:g} s)", "timeout_error",
                                          code="timeout"))
                    yield b"data: [DONE]\n\n"
                    self.complete = True
                    return
                except EngineDeadError as e:
                    self._fail_remaining("error")
                    yield _sse(error_body(str(e), "server_error", code="engine_dead"))
                    yield b"data: [DONE]\n\n"
                    self.complete = True
                    return
                for c, text, ids in news.values():
                    if self.kind == "chat" and c.finish is not None:
                        if text or (ids and self.gen.return_token_ids):
                            yield self._choice_chunk(c, text, None, ids)
                        yield self._choice_chunk(c, None, c.finish, None)
                    elif text or c.finish is not None or (ids and self.gen.return_token_ids):
                        yield self._choice_chunk(c, text, c.finish, ids)
            if self.gen.include_usage:
                obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
                yield _sse({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                            "choices": [], "usage": self.usage()})
            yield b"data: [DONE]\n\n"
            self.complete = True
        finally:
            self.close()


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 encoding of an embedding: its float32 values, little-endian."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
