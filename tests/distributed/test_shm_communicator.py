"""The shared-memory protocol, exercised in one process: one thread per rank, each with its own mapping of
the same segment, exactly as separate processes would have."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphcap.distributed.communicators import ShmCommunicator, ShmPeerError, ShmTimeoutError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def _segment_path() -> str:
    return f"/dev/shm/graphcap-test-{uuid.uuid4().hex}"


def _group(world: int, max_bytes: int = 1 << 14, timeout_s: float = 10.0) -> list[ShmCommunicator]:
    path = _segment_path()
    comms = [ShmCommunicator(path, 0, world, max_bytes, timeout_s, create=True)]
    comms += [ShmCommunicator(path, r, world, max_bytes, timeout_s, create=False) for r in range(1, world)]
    comms[0].unlink()
    return comms


@pytest.fixture
def group() -> Iterator[Callable[..., list[ShmCommunicator]]]:
    made: list[ShmCommunicator] = []

    def make(world: int, **kwargs) -> list[ShmCommunicator]:
        comms = _group(world, **kwargs)
        made.extend(comms)
        return comms

    yield make
    for c in made:
        c.close()


def _run_ranks(comms: list[ShmCommunicator], fn: Callable[[int, ShmCommunicator], object]) -> list[object]:
    """Run fn on every rank's communicator in its own thread; re-raise the first error."""
    results: list[object] = [None] * len(comms)
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, comms[rank])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank thread hangs"
    if errors:
        raise errors[0]
    return results


def _inputs(world: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return [torch.randn(shape, generator=gen).to(dtype) for _ in range(world)]
    return [torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype) for _ in range(world)]


@settings(max_examples=15, deadline=None)
@given(
    world=st.integers(2, 3),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    dim=st.integers(-1, 2),
    seed=st.integers(0, 2**16),
)
def test_collectives_match_reference(
    world: int, shape: tuple[int, ...], dtype: torch.dtype, dim: int, seed: int
) -> None:
    dim = dim % len(shape)
    xs = _inputs(world, shape, dtype, seed)
    comms = _group(world)
    try:
        outs = _run_ranks(comms, lambda r, c: (c.all_reduce(xs[r]), c.all_gather(xs[r], dim)))
    finally:
        for c in comms:
            c.close()
    reduced = xs[0].clone()
    for x in xs[1:]:
        reduced += x
    for out_reduce, out_gather in outs:
        assert out_reduce.dtype == dtype and torch.equal(out_reduce, reduced)
        assert torch.equal(out_gather, torch.cat(xs, dim))
    assert all(torch.equal(outs[0][0], o[0]) for o in outs), "ranks disagree bitwise"


def test_many_consecutive_collectives_keep_buffers_apart(group) -> None:
    """Ranks run at different speeds through 300 collectives: double buffering keeps every result exact."""
    comms = group(2)

    def rank_loop(rank: int, comm: ShmCommunicator) -> list[float]:
        sums = []
        for i in range(300):
            if rank == 1 and i % 7 == 0:
                time.sleep(0.001)
            sums.append(comm.all_reduce(torch.full((33,), float(i * (rank + 1)))).unique().item())
        return sums

    for sums in _run_ranks(comms, rank_loop):
        assert sums == [3.0 * i for i in range(300)]


def test_non_contiguous_input_and_output_is_not_a_view_of_the_segment(group) -> None:
    comms = group(2)
    xs = [torch.arange(12.0).view(3, 4).t() * (r + 1) for r in range(2)]
    outs = _run_ranks(comms, lambda r, c: c.all_reduce(xs[r]))
    _run_ranks(comms, lambda r, c: c.all_reduce(torch.zeros(3, 4)))
    _run_ranks(comms, lambda r, c: c.all_reduce(torch.zeros(3, 4)))
    for out in outs:
        assert torch.equal(out, xs[0] * 3)


def test_rejection_reasons(group) -> None:
    comm = group(2, max_bytes=256)[0]
    assert comm.rejection_reason(torch.zeros(64)) is None
    assert comm.rejection_reason(torch.zeros(65)) == "message_too_large"
    assert comm.rejection_reason(torch.zeros(1, device="meta")) == "not_cpu"


def test_missing_peer_times_out_naming_it(group) -> None:
    comms = group(3, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(ShmTimeoutError, match=r"rank\(s\) \[1, 2\] did not arrive within 0.5s"):
        comms[0].all_reduce(torch.ones(4))
    assert time.monotonic() - start < 5


def test_peer_that_closed_fails_the_waiter_at_once(group) -> None:
    comms = group(2, timeout_s=30)
    comms[1].close()
    start = time.monotonic()
    with pytest.raises(ShmPeerError, match=r"rank\(s\) \[1\] closed"):
        comms[0].all_reduce(torch.ones(4))
    assert time.monotonic() - start < 5


def test_capture_handshake_reports_a_rank_that_never_enters(group) -> None:
    comms = group(2, timeout_s=0.3)
    with pytest.raises(ShmTimeoutError, match="enter graph capture"):
        with comms[0].capture():
            pass
    assert not comms[0].active


def test_capture_switches_flag_on_every_rank(group) -> None:
    comms = group(2)

    def enter(rank: int, comm: ShmCommunicator) -> tuple[bool, bool]:
        with comm.capture():
            inside = comm.active
        return inside, comm.active

    assert _run_ranks(comms, enter) == [(True, False), (True, False)]


def test_replay_switches_to_shm_without_a_handshake(group) -> None:
    comm = group(2, timeout_s=0.2)[0]
    with comm.replay():
        assert comm.active
        with comm.replay():
            assert comm.active
        assert comm.active, "leaving a nested replay must not switch the outer one off"
    assert not comm.active


def test_attach_checks_layout_and_close_unmaps(tmp_path: Path) -> None:
    path = _segment_path()
    owner = ShmCommunicator(path, 0, 2, 1024, 1.0, create=True)
    try:
        with pytest.raises(ValueError, match="wrong size"):
            ShmCommunicator(path, 1, 3, 1024, 1.0, create=False)
        peer = ShmCommunicator(path, 1, 2, 1024, 1.0, create=False)
        owner.unlink()
        assert not Path(path).exists()
        peer.close()
        peer.close()
        assert peer.closed
    finally:
        owner.close()
        owner.unlink()
    assert owner.closed
