"""`graphcap serve` on the real SmolLM2-135M-Instruct (eager): UTF-8 streaming over a byte-level BPE tokenizer,
and a bounded load test (64 concurrent streaming clients x 4 requests) that must batch and lose nothing."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import EAGER, start_server

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

CLIENTS = 64
REQUESTS_EACH = 4
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def smol_server(server_logs):
    srv = start_server(["--model", "smollm2", *EAGER, "--kv-cache-tokens", "8192", "--threads", "1"], server_logs)
    yield srv
    code = srv.stop()
    assert code == 0, srv.stderr()


def test_utf8_streaming_never_splits_a_character(smol_server):
    client = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Repeat exactly: 🎉🎉 こんにちは世界 naïve café"}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert "こんにちは" in text and "🎉" in text  # characters the tokenizer splits over several tokens
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_load_64_concurrent_streams(smol_server):
    prompts = ["Tell me about the ocean.", "What is 2 + 2?", "Name a color.", "Write a haiku about rain."]

    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

        async def one(i: int) -> tuple[int, str | None]:
            stream = await client.completions.create(
                model="smollm2", prompt=prompts[i % len(prompts)], max_tokens=MAX_TOKENS, temperature=0.7, seed=i,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            usage, finish = None, None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    finish = c.finish_reason or finish
            return usage.completion_tokens, finish

        async def client_loop(k: int) -> list:
            return [await one(k * REQUESTS_EACH + j) for j in range(REQUESTS_EACH)]

        try:
            return [r for rs in await asyncio.gather(*(client_loop(k) for k in range(CLIENTS))) for r in rs]
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == CLIENTS * REQUESTS_EACH
    assert results == [(MAX_TOKENS, "length")] * len(results)
    health = httpx.get(smol_server.url + "/health").json()
    assert health["kv_pages_used"] == 0 and health["running"] == 0
    samples = {}
    for line in httpx.get(smol_server.url + "/metrics").text.splitlines():
        if line.startswith("graphcap_batch_size_") and 'phase="decode"' in line:
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    total = samples['graphcap_batch_size_count{phase="decode"}']
    assert samples['graphcap_batch_size_bucket{le="8.0",phase="decode"}'] < total, \
        "no decode step batched more than 8 requests"
