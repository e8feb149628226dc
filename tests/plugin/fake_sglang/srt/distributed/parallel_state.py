"""Stand-in for SGLang's parallel_state: `graph_capture` takes keyword-only arguments, so positional
arguments must fail exactly as they do unpatched. Records every call in EVENTS."""

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
    def graph_capture(
        self, *, graph_capture_context: GraphCaptureContext | None = None, stream: object = None
    ) -> Iterator[GraphCaptureContext]:
        if graph_capture_context is None:
            graph_capture_context = GraphCaptureContext(stream=stream or "sglang-side-stream")
        EVENTS.append(("host enter", graph_capture_context, stream))
        try:
            yield graph_capture_context
        finally:
            EVENTS.append(("host exit", graph_capture_context, stream))
