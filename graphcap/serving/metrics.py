"""Prometheus metrics for `graphcap serve`, in a registry of the server's own (never the global one). Decoders
report the phases "decode" and "prefill", encoders the phase "encoder" (one forward over a batch of inputs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from graphcap.serving.async_engine import EngineThread, StepInfo

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self, engine: "EngineThread", model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("graphcap_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("graphcap_request_finish", "Finished choices by finish reason "
                                "(stop, length, abort, timeout, disconnect, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter("graphcap_prompt_tokens", "Prompt tokens of accepted requests (input tokens "
                                     "of embedding requests)", registry=r)
        self.generation_tokens = Counter("graphcap_generation_tokens", "Tokens generated for clients", registry=r)
        self.ttft = Histogram("graphcap_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("graphcap_inter_token_latency_seconds", "Between consecutive tokens of a choice",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("graphcap_e2e_request_latency_seconds", "Arrival to the last token (to the "
                             "response, for embeddings)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("graphcap_engine_step_seconds", "One engine step", ["phase"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("graphcap_batch_size", "Requests that got a token in one engine step (inputs "
                                    "of one encoder forward)",
                                    ["phase"], buckets=BATCH_BUCKETS, registry=r)
        self.rejected = Counter("graphcap_rejected_requests", "Requests refused before reaching the engine",
                                ["reason"], registry=r)
        r.register(_EngineCollector(engine, model_name))

    def on_step(self, step: "StepInfo") -> None:
        """Called on the engine thread after every step (prometheus_client's metrics are thread-safe)."""
        self.step_seconds.labels(step.mode).observe(step.seconds)
        if step.batch_size:
            self.batch_size.labels(step.mode).observe(step.batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine state read at scrape time: the scheduler/pool snapshot of the latest step and `llm.stats()`."""

    def __init__(self, engine: "EngineThread", model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        eng = self.engine
        state = eng.state
        up = GaugeMetricFamily("graphcap_engine_up", "1 while the engine serves requests", labels=["state"])
        up.add_metric([state], 1.0 if state == "ready" else 0.0)
        yield up
        info = GaugeMetricFamily("graphcap_model_info", "The served model", labels=["model"])
        info.add_metric([self.model_name], 1.0)
        yield info
        snap = eng.snapshot
        yield _gauge("graphcap_requests_running", "Requests in the running batch (encoders: inputs in "
                     "the running forward)", snap.get("running", 0))
        yield _gauge("graphcap_requests_waiting", "Requests accepted and not yet running (what --max-waiting "
                     "bounds)", eng.num_waiting)
        if "kv_pages_total" in snap:  # decoders only
            yield _gauge("graphcap_kv_pages_used", "KV cache pages held by requests", snap["kv_pages_used"])
            yield _gauge("graphcap_kv_pages_total", "KV cache pages requests can use", snap["kv_pages_total"])
        if eng.info is not None:
            yield _gauge("graphcap_startup_seconds", "Building the engine (loading, graph capture)",
                         eng.info.startup_seconds)
        stats = eng.last_stats
        if not stats:
            return
        encoder = "encoder" in stats
        phases = ("encoder",) if encoder else ("decode", "prefill")
        if not encoder:
            yield _counter("graphcap_preemptions", "Requests preempted for KV pages", stats.get("preemptions", 0))
        replays = CounterMetricFamily("graphcap_graph_replays", "Steps served by a captured graph", labels=["phase"])
        fallbacks = CounterMetricFamily("graphcap_graph_eager_fallbacks", "Steps a graph runner handed to eager, "
                                        "by reason", labels=["phase", "reason"])
        mode = GaugeMetricFamily("graphcap_graph_mode", "Graph mode of each phase", labels=["phase", "mode"])
        for phase in phases:
            runner = stats.get(phase) or {}
            replays.add_metric([phase], runner.get("replays", 0))
            for reason, count in sorted((runner.get("rejects") or {}).items()):
                fallbacks.add_metric([phase, str(reason)], count)
            mode.add_metric([phase, str(runner.get("mode", "eager"))], 1.0)
        yield replays
        yield fallbacks
        yield mode
        eager = CounterMetricFamily("graphcap_eager_steps", "Steps run eagerly", labels=["phase"])
        steps = CounterMetricFamily("graphcap_engine_steps", "Engine steps (encoder: forwards of one bucket)",
                                    labels=["phase"])
        if encoder:
            counts = stats["encoder"]
            eager.add_metric(["encoder"], counts.get("eager_batches", 0))
            steps.add_metric(["encoder"], counts.get("eager_batches", 0) + counts.get("graph_batches", 0))
        else:
            for phase, count in sorted((stats.get("eager_steps") or {}).items()):
                eager.add_metric([phase], count)
            for phase in ("prefill", "decode"):
                steps.add_metric([phase], stats.get(f"{phase}_steps", 0))
        yield eager
        yield steps
        if "load_seconds" in stats:
            yield _gauge("graphcap_load_seconds", "Loading the weights (the engine's own figure)",
                         stats["load_seconds"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value))
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], float(value))
    return c
