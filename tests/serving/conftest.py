"""Servers for the serving tests: `graphcap serve` as a real process (ServerProcess), or the same app under
uvicorn in a thread of the test process (InProcessServer), whose LLM a test may slow down or break."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

# A ChatML-like template in words the test tokenizer knows (WordLevel: anything else is <unk>); "</s>" ends
# a turn, so the end-of-turn probe finds it and chat stops on it.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}a {% else %}the {% endif %}{{ m['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}then {% endif %}"
)
EAGER = ["--graph-decode", "eager", "--graph-prefill", "eager"]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chat_ckpt(ckpt_root, tokenized_ckpt) -> Path:
    """The tiny tokenized llama plus a chat template."""
    path = ckpt_root / "llama_chat"
    if not path.exists():
        shutil.copytree(tokenized_ckpt.path, path)
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


class ServerProcess:
    """`python -m graphcap serve ...` on a free loopback port; stderr goes to a file for failure messages."""

    def __init__(self, args: list[str], log_dir: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log_dir / f"serve-{self.port}.err"
        self._stderr = open(self.stderr_path, "wb")
        cmd = [sys.executable, "-m", "graphcap", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     env={**os.environ, **(env or {})})

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                last = r.status_code
                if r.status_code == 200:
                    return
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"/health not 200 within {timeout} s (last: {last}); stderr:\n{self.stderr()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode


def start_server(args: list[str], log_dir: Path, env: dict | None = None) -> ServerProcess:
    server = ServerProcess(args, log_dir, env)
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-logs")


class InProcessServer:
    """The app under uvicorn in a thread of this process (no signals there: stop() asks it to exit)."""

    def __init__(self, llm_factory, *, max_waiting: int = 256, api_key: str | None = None,
                 request_timeout: float | None = None, grace: float = 5.0, model_name: str = "tiny",
                 wait_ready: bool = True, encoder: bool = False) -> None:
        import uvicorn

        from graphcap.serving.app import ServerSettings, build_app
        from graphcap.serving.async_engine import AsyncEngine
        from graphcap.serving.embed_engine import EmbedEngine
        from graphcap.serving.metrics import ServerMetrics

        self.engine = (EmbedEngine if encoder else AsyncEngine)(llm_factory, max_waiting=max_waiting)
        self.metrics = ServerMetrics(self.engine, model_name)
        self.engine._on_step = self.metrics.on_step
        settings = ServerSettings(model_name=model_name, api_key=api_key, request_timeout=request_timeout)
        self.app = build_app(self.engine, settings, self.metrics)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="on", log_level="warning",
                                timeout_graceful_shutdown=grace)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        if wait_ready:
            assert self.engine.ready.wait(60), f"engine not ready: {self.engine.dead_reason}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


class SlowLLM:
    """Builds the tiny eager LLM with every step slowed by `delay` seconds, and able to fail on demand."""

    def __init__(self, path: Path, delay: float = 0.0, **kwargs) -> None:
        self.path, self.delay, self.kwargs = path, delay, kwargs
        self.boom = threading.Event()
        self.llm = None

    def __call__(self):
        from graphcap import LLM

        llm = LLM(str(self.path), graph_decode="eager", graph_prefill="eager", **self.kwargs)
        step = llm.step

        def slow_step():
            if self.boom.is_set():
                raise RuntimeError("injected failure for the test")
            if self.delay:
                time.sleep(self.delay)
            return step()

        llm.step = slow_step
        self.llm = llm
        return llm
