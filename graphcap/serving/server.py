"""`graphcap serve`: uvicorn in the main thread (it owns the signals), the engine in its own thread: the decoder
loop (AsyncEngine) for a decoder checkpoint, the batching encoder (EmbedEngine) for an encoder one.

The socket opens at once and /health answers 503 while the engine builds; a line on stderr says when it is
ready and where. SIGTERM (or Ctrl-C): stop accepting, let in-flight requests finish for up to the grace period,
abort what is left, exit 0. An engine that fails to build ends the server with the reason and exit status 2
for a user error (bad model path, bad option), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServeOptions:
    model: str
    engine_kwargs: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting: int = 256
    request_timeout: float | None = None
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0
    access_log: bool = False
    verbose: bool = False
    threads: int = 0  # torch intra-op threads; 0: torch's own choice


def serve(opts: ServeOptions) -> int:
    import uvicorn

    from graphcap.engine.embedder import is_encoder_checkpoint
    from graphcap.errors import UserError
    from graphcap.serving.app import ServerSettings, build_app
    from graphcap.serving.async_engine import AsyncEngine, EngineThread
    from graphcap.serving.embed_engine import EmbedEngine
    from graphcap.serving.metrics import ServerMetrics

    def build_llm():
        from graphcap import LLM

        return LLM(opts.model, **opts.engine_kwargs)

    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    name = opts.served_model_name or opts.model
    engine_class = EmbedEngine if is_encoder_checkpoint(opts.model) else AsyncEngine
    engine = engine_class(build_llm, max_waiting=opts.max_waiting)
    metrics = ServerMetrics(engine, name)
    engine._on_step = metrics.on_step
    state: dict[str, Any] = {"exit": 0, "server": None}
    host = f"[{opts.host}]" if ":" in opts.host else opts.host

    async def announce() -> None:
        server = state["server"]
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.02)
        if server.started:
            print(f"graphcap: serving {name} on http://{host}:{opts.port}", file=sys.stderr, flush=True)

    def on_ready() -> None:
        asyncio.get_running_loop().create_task(announce())

    def on_startup_failure(eng: EngineThread) -> None:
        print(f"graphcap: error: {eng.dead_reason}", file=sys.stderr, flush=True)
        state["exit"] = 2 if isinstance(eng.startup_error, UserError) else 1
        state["server"].should_exit = True

    settings = ServerSettings(model_name=name, api_key=opts.api_key, request_timeout=opts.request_timeout,
                              stop_timeout=max(5.0, opts.shutdown_timeout), on_ready=on_ready,
                              on_startup_failure=on_startup_failure)
    app = build_app(engine, settings, metrics)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn re-raises the signal once it has shut down (the process would die of SIGTERM); a
            # graceful stop here is a normal exit, status 0.
            app.state.draining.value = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    config = uvicorn.Config(app, host=opts.host, port=opts.port, lifespan="on", access_log=opts.access_log,
                            log_level="info" if opts.verbose else "warning",
                            timeout_graceful_shutdown=opts.shutdown_timeout)
    server = Server(config)
    state["server"] = server
    server.run()
    if state["exit"] == 0 and not server.started:
        return 1  # could not bind (uvicorn said why)
    return state["exit"]
