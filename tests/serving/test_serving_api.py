"""`graphcap serve` as a real process on the tiny llama (with a chat template), driven by the official `openai`
client and by raw HTTP: greedy outputs equal `LLM.generate`/`LLM.chat`, streaming equals non-streaming, stop
strings and stop token ids, n choices, seeds, usage, errors in OpenAI's shape (/v1/embeddings included: a
decoder does not serve it), metrics, disconnects, and `graphcap bench serve` against it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from graphcap import LLM, SamplingParams

from .conftest import EAGER, start_server

pytestmark = pytest.mark.slow

MODEL = "tiny"
PROMPTS = ["the cat sat on the mat", "a dog ran far away", "then it slept", "the mat"]
CONVERSATION = [{"role": "system", "content": "a cat"}, {"role": "user", "content": "the dog ran"}]


@pytest.fixture(scope="module")
def server(chat_ckpt, server_logs):
    srv = start_server(["--model", str(chat_ckpt), *EAGER, "--served-model-name", MODEL, "--threads", "1"],
                       server_logs)
    yield srv
    code = srv.stop()
    assert code == 0, f"the server exited with {code} on SIGTERM:\n{srv.stderr()}"


@pytest.fixture(scope="module")
def ref(chat_ckpt):
    with LLM(str(chat_ckpt), graph_decode="eager", graph_prefill="eager") as llm:
        yield llm


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_startup_line_models_and_health(server):
    line = f"graphcap: serving {MODEL} on {server.url}"
    deadline = time.monotonic() + 5  # printed once uvicorn listens and the engine is ready, as /health turns 200
    while line not in server.stderr():
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.05)
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ready" and health["kv_pages_used"] == 0 and health["kv_pages_total"] > 0


def test_completions_equal_generate(client, ref):
    expected = ref.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    for prompt, exp in zip(PROMPTS, expected):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"return_token_ids": True})
        choice = out.choices[0]
        assert choice.token_ids == exp.token_ids
        assert choice.text == exp.text
        assert choice.finish_reason == exp.finish_reason
        assert out.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert out.usage.completion_tokens == len(exp.token_ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # several prompts in one request: one choice each, in order
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in out.choices] == [e.text for e in expected]
    # token-id prompts
    out = client.completions.create(model=MODEL, prompt=expected[0].prompt_token_ids, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected[0].text


def test_streamed_completion_equals_generate(client, ref):
    for prompt in PROMPTS[:2]:
        exp = ref.generate([prompt], SamplingParams(max_new_tokens=20))[0]
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == exp.text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [exp.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)
        assert chunks[-1].usage.prompt_tokens == len(exp.prompt_token_ids)


def test_chat_equals_llm_chat(client, ref):
    exp = ref.chat(CONVERSATION, SamplingParams(max_new_tokens=16))[0]
    out = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == exp.text
    assert out.choices[0].finish_reason == exp.finish_reason
    assert out.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert out.usage.completion_tokens == len(exp.token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == exp.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [exp.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(exp.token_ids)


def test_chat_stops_at_end_of_turn(client, ref):
    """The template ends turns with </s>: a reply that reaches it stops there, finish_reason 'stop'."""
    finishes = []
    for content in ("the cat", "the dog ran far", "sat on", "and then"):
        conv = [{"role": "user", "content": content}]
        exp = ref.chat(conv, SamplingParams(max_new_tokens=60))[0]
        out = client.chat.completions.create(model=MODEL, messages=conv, max_tokens=60, temperature=0)
        assert (out.choices[0].message.content, out.choices[0].finish_reason) == (exp.text, exp.finish_reason)
        assert out.usage.completion_tokens == len(exp.token_ids)
        finishes.append(exp.finish_reason)
    assert "stop" in finishes and "length" in finishes  # both endings were exercised


def test_stop_strings_across_tokens(client, ref):
    prompt = PROMPTS[0]
    exp = ref.generate([prompt], SamplingParams(max_new_tokens=16))[0]
    words = exp.text.split(" ")
    assert len(words) >= 6
    stop = words[3][-2:] + " " + words[4][:2]  # spans the boundary between two tokens
    cut = exp.text.index(stop)
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                        stop=["never-there", stop], stream=stream,
                                        **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            text, finish, usage = out.choices[0].text, [out.choices[0].finish_reason], out.usage
        assert text == exp.text[:cut]
        assert finish == ["stop"]
        assert usage.completion_tokens == 5  # up to the token that completed the stop string


def test_stop_token_ids(client, ref):
    exp = ref.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12))[0]
    stop_id = exp.token_ids[4]
    first = exp.token_ids.index(stop_id)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [stop_id], "return_token_ids": True})
    assert out.choices[0].token_ids == exp.token_ids[:first + 1]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == ref.tokenizer.decode(exp.token_ids[:first])  # the stop token's text stays out


def test_n_choices_and_seeds(client, ref):
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=1.0, n=3, seed=7,
              extra_body={"top_k": 50, "return_token_ids": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]  # same seed, same samples
    assert len({tuple(c.token_ids) for c in a.choices}) == 3  # choice j samples with seed + j
    assert a.usage.completion_tokens == sum(len(c.token_ids) for c in a.choices)
    assert a.usage.prompt_tokens == len(ref.tokenizer.encode(PROMPTS[2]))  # the prompt counts once
    exp = ref.generate([PROMPTS[2]] * 3, [SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=7 + j)
                                          for j in range(3)])
    assert [c.token_ids for c in a.choices] == [e.token_ids for e in exp]
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


@pytest.mark.parametrize("path,body,param,code", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "the"}, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "the"}, "model", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "max_tokens": -1}, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "max_tokens": "ten"}, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "temperature": "hot"}, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "top_p": 0}, "top_p", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "n": 0}, "n", None),
    ("/v1/completions", {"model": MODEL, "prompt": 7}, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the " * 300}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "the cat", "max_tokens": 300}, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "echo": True}, "echo", "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "stream_options": {"include_usage": True}},
     "stream_options", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "stop": [""]}, "stop", None),
    ("/v1/completions", {"model": MODEL, "prompt": "the", "bogus": 1}, "bogus", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "the"}], "logprobs": True},
     "logprobs", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "the"}], "top_logprobs": 2},
     "top_logprobs", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "the"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "unsupported_parameter"),
    ("/v1/embeddings", {"model": MODEL, "input": "the cat"}, "model", "unsupported_endpoint"),
])
def test_invalid_requests_are_400s(server, path, body, param, code):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    if code is not None:
        assert err["code"] == code
    if param in ("logprobs", "top_logprobs"):
        assert "not supported" in err["message"]


def test_other_bad_requests(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in _error(r)["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and _error(r)["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model=MODEL, messages=CONVERSATION, logprobs=True)


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['graphcap_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples['graphcap_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert samples["graphcap_prompt_tokens_total"] > 0 and samples["graphcap_generation_tokens_total"] >= 4
    assert samples["graphcap_time_to_first_token_seconds_count"] >= 1
    assert samples["graphcap_inter_token_latency_seconds_count"] >= 3
    assert samples["graphcap_kv_pages_total"] > 0 and "graphcap_kv_pages_used" in samples
    assert "graphcap_requests_running" in samples and "graphcap_requests_waiting" in samples
    assert samples['graphcap_graph_replays_total{phase="decode"}'] == 0  # eager engine: no graphs
    assert samples['graphcap_graph_mode{mode="eager",phase="decode"}'] == 1
    assert samples['graphcap_eager_steps_total{phase="decode"}'] >= 3
    assert samples["graphcap_startup_seconds"] > 0
    assert samples['graphcap_engine_up{state="ready"}'] == 1
    assert samples['graphcap_batch_size_count{phase="decode"}'] >= 3


def test_disconnects_free_pages_and_survivors_finish(server):
    """16 streams cut mid-way: within 2 s their requests are gone and their pages back; 4 others finish."""
    body = {"model": MODEL, "prompt": "the cat sat", "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            async def cut() -> None:
                async with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 200}) as resp:
                    assert resp.status_code == 200
                    seen = 0
                    async for line in resp.aiter_lines():
                        seen += line.startswith("data: {")
                        if seen == 3:
                            return  # leaving the block closes the connection mid-stream

            async def survive() -> dict:
                async with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 120}) as resp:
                    events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                return json.loads(events[-2])["usage"]

            survivors = [asyncio.create_task(survive()) for _ in range(4)]
            await asyncio.gather(*(cut() for _ in range(16)))
            t_cut = time.monotonic()
            pages_each = -(-(4 + 120) // 16)
            while True:
                h = (await http.get("/health")).json()
                if h["running"] + h["waiting"] <= 4 and h["kv_pages_used"] <= 4 * pages_each:
                    break
                assert time.monotonic() - t_cut < 2.0, f"aborted requests still hold the engine: {h}"
                await asyncio.sleep(0.05)
            usages = await asyncio.gather(*survivors)
            assert [u["completion_tokens"] for u in usages] == [120] * 4
            t_done = time.monotonic()
            while (await http.get("/health")).json()["kv_pages_used"] != 0:
                assert time.monotonic() - t_done < 2.0, "pages not back after every request ended"
                await asyncio.sleep(0.05)

    asyncio.run(main())
    text = httpx.get(server.url + "/metrics").text
    assert 'graphcap_request_finish_total{reason="disconnect"} 16.0' in text


def test_bench_serve_against_the_server(server, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "graphcap", "bench", "serve", "--url", server.url, "--concurrency", "4",
                        "--requests", "8", "--max-tokens", "8", "--ignore-eos", "--prompt", "the cat sat",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("bench serve: tiny") and "TTFT (ms)" in r.stdout and "inter-token (ms)" in r.stdout
    result = json.loads(out.read_text())
    s = result["summary"]
    assert (s["completed"], s["errors"], s["output_tokens"]) == (8, 0, 64)
    assert s["ttft_ms"]["p50"] > 0 and s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
    # A stream that fell behind gets its tokens merged into fewer chunks; gaps exist only between chunks.
    assert s["itl_ms"]["p50"] is None or s["itl_ms"]["p99"] >= s["itl_ms"]["p50"] >= 0
    assert s["output_tokens_per_s"] > 0
