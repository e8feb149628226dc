"""`graphcap serve` as a process: SIGTERM lets an in-flight stream finish and exits 0; an engine that cannot be
built ends the process with the reason and status 2."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import httpx
import pytest

from .conftest import EAGER, ServerProcess, free_port, start_server

pytestmark = pytest.mark.slow


def test_sigterm_finishes_in_flight_requests_and_exits_0(chat_ckpt, server_logs):
    srv = start_server(["--model", str(chat_ckpt), *EAGER, "--served-model-name", "tiny", "--threads", "1"],
                       server_logs)
    try:
        first_chunk = threading.Event()
        lines: list[str] = []

        def stream() -> None:
            body = {"model": "tiny", "prompt": "the cat", "max_tokens": 250, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"completion_tokens":250' in lines[-2]
        assert srv.proc.wait(30) == 0, srv.stderr()
    finally:
        srv.stop()


def test_engine_that_cannot_start_exits_2(tmp_path, server_logs):
    srv = ServerProcess(["--model", str(tmp_path / "no-such-checkpoint"), *EAGER], server_logs)
    try:
        code = srv.proc.wait(120)
    finally:
        srv.stop()
    assert code == 2, srv.stderr()
    assert "graphcap: error: the engine failed to start" in srv.stderr()


def test_serve_flags_are_checked_before_starting():
    r = subprocess.run([sys.executable, "-m", "graphcap", "serve", "--model", "tiny", "--max-waiting", "-1",
                        "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-waiting" in r.stderr
