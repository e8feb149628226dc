"""Stand-in for vLLM's parallel_state: `graph_capture(self, graph_capture_context=None)`, positional or
keyword, yielding a context object. Records every call in EVENTS so tests can check order and arguments."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

EVENTS: list[object] = []


@dataclass
class GraphCaptureContext:
    stream: object


class GroupCoordinator:
    @contextlib.contextmanager
    def graph_capture(self, graph_capture_context: GraphCaptureContext | None = None) -> Iterator[GraphCaptureContext]:
        """Host docstring."""
        if graph_capture_context is None:
            graph_capture_context = GraphCaptureContext(stream="vllm-side-stream")
        EVENTS.append(("host enter", graph_capture_context))
        try:
            yield graph_capture_context
        finally:
            EVENTS.append(("host exit", graph_capture_context))
