"""The coordinator in a one-rank gloo world, in this process: setup from torchrun's variables, teardown,
capture bookkeeping over every communicator, and tracing of the collective custom ops."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from graphcap.distributed import ops, parallel_state
from graphcap.distributed.coordinator import GroupCoordinator, destroy_distributed, init_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingCommunicator:
    """Logs when its capture and replay contexts are entered and left; optionally fails on capture entry."""

    def __init__(self, name: str, log: list[str], fail_on_enter: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail_on_enter = fail_on_enter

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        if self.fail_on_enter:
            raise RuntimeError(f"{self.name} cannot capture")
        self.log.append(f"enter {self.name}")
        try:
            yield
        finally:
            self.log.append(f"exit {self.name}")

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        self.log.append(f"replay {self.name}")
        yield

    def close(self) -> None:
        self.log.append(f"close {self.name}")


@pytest.fixture
def coord(monkeypatch: pytest.MonkeyPatch) -> Iterator[GroupCoordinator]:
    """A one-rank world set up the way torchrun would: from environment variables only."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    coordinator = init_distributed(backend="gloo", timeout_s=10)
    yield coordinator
    destroy_distributed()


def test_init_from_env_registers_the_tp_group(coord: GroupCoordinator) -> None:
    assert dist.get_world_size() == 1 and coord.rank_in_group == 0 and coord.local_rank == 0
    assert parallel_state.get_tp_group() is coord and ops.get_group("tp") is coord
    assert [c.name for c in coord.communicators] == ["torch_dist"], "one rank has nobody to share memory with"


def test_destroy_frees_everything() -> None:
    coordinator = init_distributed(world_size=1, rank=0, backend="gloo", timeout_s=10)
    log: list[str] = []
    coordinator.communicators.append(RecordingCommunicator("rec", log))
    destroy_distributed()
    assert log == ["close rec"]
    assert not dist.is_initialized() and parallel_state.get_tp_group() is None
    with pytest.raises(RuntimeError, match="init_distributed"):
        ops.get_group("tp")
    destroy_distributed()


def test_graph_capture_enters_every_communicator_once(coord: GroupCoordinator) -> None:
    log: list[str] = []
    coord.communicators += [RecordingCommunicator("a", log), RecordingCommunicator("b", log)]
    assert not coord.is_capturing
    with coord.graph_capture() as ctx:
        assert ctx.stream is None and coord.is_capturing
        log.append("body")
        with coord.graph_capture():
            log.append("nested body")
        assert coord.is_capturing
    assert not coord.is_capturing
    assert log == ["enter a", "enter b", "body", "nested body", "exit b", "exit a"]


def test_graph_replay_enters_every_communicator_replay_but_not_capture(coord: GroupCoordinator) -> None:
    log: list[str] = []
    coord.communicators += [RecordingCommunicator("a", log), RecordingCommunicator("b", log)]
    with coord.graph_replay():
        log.append("body")
    assert log == ["replay a", "replay b", "body"] and not coord.is_capturing


def test_failed_capture_entry_leaves_no_communicator_capturing(coord: GroupCoordinator) -> None:
    log: list[str] = []
    coord.communicators += [RecordingCommunicator("a", log), RecordingCommunicator("bad", log, fail_on_enter=True)]
    with pytest.raises(RuntimeError, match="bad cannot capture"):
        with coord.graph_capture():
            pytest.fail("the body must not run")
    assert log == ["enter a", "exit a"] and not coord.is_capturing


def test_collectives_return_new_tensors_and_count_the_path(coord: GroupCoordinator) -> None:
    x = torch.randn(3, 4)
    reduced = coord.all_reduce(x)
    gathered = coord.all_gather(x, dim=-1)
    assert torch.equal(reduced, x) and reduced.data_ptr() != x.data_ptr()
    assert torch.equal(gathered, x) and gathered.data_ptr() != x.data_ptr()
    assert coord.stats() == {"torch_dist": 2, "fallbacks": {}}


def test_compile_traces_collectives_as_custom_ops_without_graph_breaks(coord: GroupCoordinator) -> None:
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    def body(x: torch.Tensor) -> torch.Tensor:
        y = coord.all_reduce(x + 1)
        return coord.all_gather(y * 2, dim=0)

    x = torch.randn(2, 3)
    out = torch.compile(body, backend=recording_backend, fullgraph=True)(x)
    assert torch.equal(out, (x + 1) * 2)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("graphcap.all_reduce" in t for t in targets), targets
    assert any("graphcap.all_gather" in t for t in targets), targets
    assert coord.stats()["torch_dist"] == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_runs_on_a_side_stream_and_replays_the_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    coordinator = init_distributed(world_size=1, rank=0, backend="nccl", timeout_s=60)
    try:
        x = torch.ones(16, device="cuda")
        coordinator.all_reduce(x)
        graph = torch.cuda.CUDAGraph()
        with coordinator.graph_capture() as ctx:
            assert ctx.stream is not None and torch.cuda.current_stream() == ctx.stream
            with torch.cuda.graph(graph, stream=ctx.stream):
                out = coordinator.all_reduce(x * 2)
        x.fill_(3.0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, torch.full_like(x, 6.0))
    finally:
        destroy_distributed()
