"""The host-framework patch against stand-ins for vLLM's and SGLang's parallel_state modules
(tests/plugin/fake_vllm, tests/plugin/fake_sglang), which mimic their `graph_capture` signatures."""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from graphcap import plugin
from graphcap.distributed.coordinator import GroupCoordinator, destroy_distributed, init_distributed
from graphcap.plugin import apply_graph_capture_patch, prepare_model

VLLM = "fake_vllm.distributed.parallel_state"
SGLANG = "fake_sglang.srt.distributed.parallel_state"


class RecordingCommunicator:
    """Appends its capture entry and exit to the host module's event list, to check nesting order."""

    name = "recording"

    def __init__(self, events: list[object]) -> None:
        self.events = events

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self.events.append("graphcap enter")
        try:
            yield
        finally:
            self.events.append("graphcap exit")

    def replay(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        return None


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    """Fresh, unpatched copies of both stand-in host modules for each test."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))

    def purge() -> None:
        for name in [m for m in sys.modules if m.split(".")[0] in ("fake_vllm", "fake_sglang")]:
            del sys.modules[name]

    purge()
    yield {"vllm": pytest.importorskip(VLLM), "sglang": pytest.importorskip(SGLANG)}
    purge()


@pytest.fixture
def graphcap_tp() -> Iterator[GroupCoordinator]:
    coordinator = init_distributed(world_size=1, rank=0, backend="gloo", timeout_s=10)
    yield coordinator
    destroy_distributed()


def test_patch_wraps_once_and_keeps_the_host_signature(hosts: dict[str, ModuleType]) -> None:
    cls = hosts["vllm"].GroupCoordinator
    original = cls.graph_capture
    assert apply_graph_capture_patch(VLLM) is True
    wrapped = cls.graph_capture
    assert apply_graph_capture_patch(VLLM) is True
    assert cls.graph_capture is wrapped and wrapped.__wrapped__ is original
    assert wrapped.__name__ == "graph_capture" and wrapped.__doc__ == "Host docstring."
    assert inspect.signature(wrapped) == inspect.signature(original)


def test_vllm_style_arguments_pass_through_positionally_and_by_keyword(hosts: dict[str, ModuleType]) -> None:
    host = hosts["vllm"]
    apply_graph_capture_patch(VLLM)
    mine = host.GraphCaptureContext(stream="mine")
    coordinator = host.GroupCoordinator()
    with coordinator.graph_capture(mine) as ctx:
        assert ctx is mine
    with coordinator.graph_capture(graph_capture_context=mine) as ctx:
        assert ctx is mine
    with coordinator.graph_capture() as ctx:
        assert ctx.stream == "vllm-side-stream"
    assert [e[1] for e in host.EVENTS] == [mine, mine, mine, mine, ctx, ctx]
    with pytest.raises(TypeError):
        with coordinator.graph_capture(mine, mine):
            pass


def test_sglang_style_keyword_only_arguments_pass_through(hosts: dict[str, ModuleType]) -> None:
    host = hosts["sglang"]
    apply_graph_capture_patch(SGLANG)
    mine = host.GraphCaptureContext(stream="mine")
    coordinator = host.GroupCoordinator()
    with coordinator.graph_capture(graph_capture_context=mine, stream="s1") as ctx:
        assert ctx is mine
    with coordinator.graph_capture(stream="s2") as ctx2:
        assert ctx2.stream == "s2"
    assert host.EVENTS == [("host enter", mine, "s1"), ("host exit", mine, "s1"),
                           ("host enter", ctx2, "s2"), ("host exit", ctx2, "s2")]
    with pytest.raises(TypeError):
        with coordinator.graph_capture(mine):
            pass


@pytest.mark.parametrize("which", ["vllm", "sglang"])
def test_graphcap_capture_surrounds_the_host_context(
    hosts: dict[str, ModuleType], graphcap_tp: GroupCoordinator, which: str
) -> None:
    host = hosts[which]
    graphcap_tp.communicators.append(RecordingCommunicator(host.EVENTS))
    apply_graph_capture_patch(VLLM if which == "vllm" else SGLANG)
    with host.GroupCoordinator().graph_capture(graph_capture_context=host.GraphCaptureContext("s")):
        assert graphcap_tp.is_capturing
        host.EVENTS.append("body")
    assert not graphcap_tp.is_capturing
    assert [e if isinstance(e, str) else e[0] for e in host.EVENTS] == [
        "graphcap enter", "host enter", "body", "host exit", "graphcap exit"
    ]


def test_graphcap_state_is_read_at_capture_time_not_patch_time(hosts: dict[str, ModuleType]) -> None:
    host = hosts["vllm"]
    assert apply_graph_capture_patch(VLLM)
    coordinator = host.GroupCoordinator()

    def kinds() -> list[str]:
        with coordinator.graph_capture():
            pass
        kinds = [e if isinstance(e, str) else e[0] for e in host.EVENTS]
        host.EVENTS.clear()
        return kinds

    assert kinds() == ["host enter", "host exit"]
    init_distributed(world_size=1, rank=0, backend="gloo", timeout_s=10).communicators.append(
        RecordingCommunicator(host.EVENTS)
    )
    try:
        assert kinds() == ["graphcap enter", "host enter", "host exit", "graphcap exit"]
    finally:
        destroy_distributed()
    assert kinds() == ["host enter", "host exit"]


def test_defaults_patch_every_importable_host(hosts: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin.graph_capture_patch, "DEFAULT_HOST_MODULES", (VLLM, "graphcap_missing_host", SGLANG))
    assert apply_graph_capture_patch() is True
    for host in hosts.values():
        assert getattr(host.GroupCoordinator.graph_capture, "__wrapped__", None) is not None


@pytest.mark.parametrize(
    ("module_path", "reason"),
    [("graphcap_missing_host.distributed.parallel_state", "cannot import"), ("logging", "has no GroupCoordinator")],
)
def test_nothing_to_patch_returns_false_and_logs_why(
    module_path: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="graphcap.plugin.graph_capture_patch"):
        assert apply_graph_capture_patch(module_path) is False
    assert any(reason in r.getMessage() and module_path in r.getMessage() for r in caplog.records)


def test_prepare_model_patches_once_and_returns_the_model(hosts: dict[str, ModuleType]) -> None:
    model = object()
    assert prepare_model(model, VLLM) is model
    wrapped = hosts["vllm"].GroupCoordinator.graph_capture
    assert prepare_model(model, VLLM) is model
    assert hosts["vllm"].GroupCoordinator.graph_capture is wrapped and wrapped.__wrapped__ is not None
    assert not getattr(wrapped.__wrapped__, "__graphcap_graph_capture_patch__", False), "wrapped twice"
