"""`graphcap bench serve`: a load generator for an OpenAI-compatible server (graphcap serve, or any other).

`--concurrency` clients each send streaming requests back to back until `--requests` have been sent; every
request records when each chunk arrived. Reported: throughput (requests, output tokens per second), time to
first token, inter-token latency and end-to-end latency percentiles (p50/p90/p99), and errors. The client is
plain asyncio over HTTP/1.1 (no extra dependency, nothing between the socket and the clock).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from graphcap.errors import UserError


@dataclass
class BenchServeOptions:
    url: str = "http://127.0.0.1:8000"
    concurrency: int = 8
    requests: int = 64
    max_tokens: int = 64
    prompt: str = "Write a short story about a robot learning to paint."
    model: str | None = None
    api_key: str | None = None
    ignore_eos: bool = False
    timeout: float = 600.0
    chat: bool = False


@dataclass
class _Result:
    ok: bool
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    latency: float | None = None
    itls: list[float] | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0


class _HTTPError(Exception):
    pass


async def _request(url: str, method: str, path: str, body: dict | None, headers: dict[str, str], timeout: float,
                   on_event=None) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection. With `on_event`, a 200 response is read as server-sent
    events and each `data:` payload is passed to it as it arrives; otherwise the body is returned."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    base = parts.path.rstrip("/")
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {base}{path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             "Accept: text/event-stream, application/json", f"Content-Length: {len(payload)}"]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ssl.create_default_context() if secure else None), timeout)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status_line = await reader.readline()
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise _HTTPError(f"bad status line {status_line!r}") from None
        resp_headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            resp_headers[k.strip().lower()] = v.strip()
        chunked = "chunked" in resp_headers.get("transfer-encoding", "").lower()
        if status != 200 or on_event is None:
            if chunked:
                data = b"".join([c async for c in _chunks(reader)])
            elif "content-length" in resp_headers:
                data = await reader.readexactly(int(resp_headers["content-length"]))
            else:
                data = await reader.read()
            return status, data
        buf = b""
        source = _chunks(reader) if chunked else _raw(reader)
        async for piece in source:
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        on_event(line[5:].strip())
        return status, b""
    finally:
        writer.close()


async def _chunks(reader: asyncio.StreamReader):
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readline()
        yield data


async def _raw(reader: asyncio.StreamReader):
    while True:
        data = await reader.read(65536)
        if not data:
            return
        yield data


def _headers(opts: BenchServeOptions) -> dict[str, str]:
    return {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}


async def _model_name(opts: BenchServeOptions) -> str:
    status, data = await _request(opts.url, "GET", "/v1/models", None, _headers(opts), opts.timeout)
    if status != 200:
        raise UserError(f"GET {opts.url}/v1/models answered {status}: {data[:200]!r}")
    models = json.loads(data).get("data") or []
    if not models:
        raise UserError(f"{opts.url} serves no model")
    return models[0]["id"]


async def _one(opts: BenchServeOptions, model: str) -> _Result:
    body: dict = {"model": model, "max_tokens": opts.max_tokens, "stream": True, "temperature": 0.0,
                  "stream_options": {"include_usage": True}, "return_token_ids": True}
    if opts.chat:
        body["messages"] = [{"role": "user", "content": opts.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = opts.prompt
        path = "/v1/completions"
    if opts.ignore_eos:
        body["ignore_eos"] = True
    res = _Result(ok=False, start=time.perf_counter(), itls=[])
    state = {"last": None, "tokens": 0, "usage": None, "error": None, "done": False}

    def on_event(data: bytes) -> None:
        now = time.perf_counter()
        if data == b"[DONE]":
            state["done"] = True
            return
        obj = json.loads(data)
        if "error" in obj:
            state["error"] = obj["error"].get("message", str(obj["error"]))
            return
        if obj.get("usage"):
            state["usage"] = obj["usage"]
        for choice in obj.get("choices") or []:
            ids = choice.get("token_ids")
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            n = len(ids) if ids is not None else (1 if text else 0)
            if n == 0:
                continue
            if state["last"] is None:
                res.ttft = now - res.start
            else:
                gap = now - state["last"]
                res.itls.extend([gap / n] * n)
            state["last"] = now
            state["tokens"] += n

    try:
        status, data = await asyncio.wait_for(
            _request(opts.url, "POST", path, body, _headers(opts), opts.timeout, on_event), opts.timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, _HTTPError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - res.start
    if status != 200:
        try:
            res.error = f"HTTP {status}: {json.loads(data)['error']['message']}"
        except (ValueError, KeyError, TypeError):
            res.error = f"HTTP {status}: {data[:200]!r}"
    elif state["error"] is not None:
        res.error = state["error"]
    elif not state["done"]:
        res.error = "the stream ended without [DONE]"
    else:
        res.ok = True
        usage = state["usage"] or {}
        res.completion_tokens = usage.get("completion_tokens", state["tokens"])
        res.prompt_tokens = usage.get("prompt_tokens", 0)
    return res


async def _run(opts: BenchServeOptions) -> tuple[list[_Result], float, str]:
    model = opts.model or await _model_name(opts)
    results: list[_Result] = []
    remaining = [opts.requests]

    async def client() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            results.append(await _one(opts, model))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(opts.concurrency, opts.requests))))
    return results, time.perf_counter() - t0, model


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 and the mean, in milliseconds (nearest-rank percentiles)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, int(-(-p * len(s) // 100)) - 1))] * 1000

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "mean": sum(s) / len(s) * 1000}


def run_serve_bench(opts: BenchServeOptions) -> dict:
    if not opts.url.startswith(("http://", "https://")):
        raise UserError(f"--url must start with http:// or https://, got {opts.url!r}")
    try:
        results, duration, model = asyncio.run(_run(opts))
    except OSError as e:
        raise UserError(f"cannot reach {opts.url}: {e}") from None
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "requests": len(results), "completed": len(ok), "errors": len(errors), "duration_s": round(duration, 3),
        "requests_per_s": len(ok) / duration if duration else 0.0,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration if duration else 0.0,
        "prompt_tokens": in_tokens,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itls or []]),
        "latency_ms": percentiles([r.latency for r in ok if r.latency is not None]),
    }
    distinct_errors: dict[str, int] = {}
    for e in errors:
        distinct_errors[e] = distinct_errors.get(e, 0) + 1
    return {
        "config": {"url": opts.url, "model": model, "concurrency": opts.concurrency, "requests": opts.requests,
                   "max_tokens": opts.max_tokens, "endpoint": "chat" if opts.chat else "completions",
                   "ignore_eos": opts.ignore_eos},
        "summary": summary,
        "error_messages": distinct_errors,
        "per_request": [{"ok": r.ok, "error": r.error, "ttft_ms": None if r.ttft is None else r.ttft * 1000,
                         "latency_ms": None if r.latency is None else r.latency * 1000,
                         "completion_tokens": r.completion_tokens} for r in results],
    }


def render(result: dict) -> str:
    c, s = result["config"], result["summary"]

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"bench serve: {c['model']} at {c['url']} ({c['endpoint']}), concurrency {c['concurrency']}, "
        f"{c['requests']} requests x {c['max_tokens']} max tokens",
        f"completed {s['completed']}/{s['requests']}, errors {s['errors']}, {s['duration_s']:.2f} s, "
        f"{s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s",
        "",
        f"{'metric':<24}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("itl_ms", "inter-token (ms)"), ("latency_ms", "latency (ms)")):
        p = s[key]
        lines.append(f"{label:<24}{fmt(p['p50']):>10}{fmt(p['p90']):>10}{fmt(p['p99']):>10}{fmt(p['mean']):>10}")
    for message, count in result["error_messages"].items():
        lines.append(f"error x{count}: {message}")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
