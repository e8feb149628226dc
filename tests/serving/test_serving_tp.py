"""`graphcap serve --tp 2`: the engine thread drives two spawned tensor-parallel ranks; greedy completions
(plain and streamed) equal tp_size=1 `LLM.generate`, and SIGTERM ends the ranks with the server (exit 0)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from graphcap import LLM, SamplingParams

from .conftest import EAGER, start_server

pytestmark = pytest.mark.slow

PROMPTS = [[1, 2, 3, 4, 5], [7] * 19, [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]]


def test_serve_tp2_equals_tp1(server_logs):
    with LLM("tiny", kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as single:
        want = [o.token_ids for o in single.generate(prompt_token_ids=PROMPTS,
                                                     sampling_params=SamplingParams(max_new_tokens=10))]
    srv = start_server(["--model", "tiny", "--tp", "2", *EAGER, "--kv-cache-tokens", "1024"], server_logs)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=10, temperature=0,
                                        extra_body={"return_token_ids": True})
        assert [c.token_ids for c in out.choices] == want
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                           stream=True, extra_body={"return_token_ids": True})
        assert [t for c in chunks if c.choices for t in getattr(c.choices[0], "token_ids", None) or []] == want[1]
        assert httpx.get(srv.url + "/health").json()["status"] == "ready"
        ranks = _children(srv.proc.pid)
        assert len(ranks) >= 2, "expected the two spawned ranks"
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()
    deadline = time.monotonic() + 10  # a rank tears its process group down after the server's exit
    while [pid for pid in ranks if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks if _alive(pid)], "ranks outlived the server by 10 s"


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc): the server's spawned ranks (and multiprocessing's tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
