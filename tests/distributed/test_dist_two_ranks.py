"""Two CPU ranks over gloo: both collective paths are correct, capture (and replay) select the
shared-memory path, compiled code reaches it through the custom op, and a failing rank never hangs its peer.

The functions named `rank_*` run inside the spawned ranks (see conftest.py); the tests check what they
return. Each spawn costs two fresh interpreters, so each test packs several checks into one run.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

pytestmark = pytest.mark.slow

SHM_MAX_BYTES = 4096


def _rank_input(rank: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(shape, generator=gen).to(dtype)


def rank_collectives(rank: int, world: int) -> dict:
    from graphcap.distributed import parallel_state
    from graphcap.distributed.coordinator import destroy_distributed, init_distributed

    coord = init_distributed(timeout_s=20, shm_max_bytes=SHM_MAX_BYTES)
    assert parallel_state.get_tp_group() is coord and parallel_state.get_tp_rank() == rank
    assert [c.name for c in coord.communicators] == ["shm", "torch_dist"]
    shm = coord.shm
    inputs = [_rank_input(r, (4, 6)) for r in range(world)]
    gathered_inputs = [_rank_input(r, (3, 5), torch.bfloat16) for r in range(world)]
    x, g = inputs[rank], gathered_inputs[rank]

    def run_all() -> list[torch.Tensor]:
        return [
            coord.all_reduce(x),
            coord.all_gather(g, 0),
            coord.all_gather(g, -1),
            parallel_state.tensor_model_parallel_all_reduce(x),
        ]

    eager = run_all()
    after_eager = coord.stats()
    with coord.graph_capture() as ctx:
        assert ctx.stream is None and coord.is_capturing and shm.active
        captured = run_all()
        after_capture = coord.stats()
        big = coord.all_reduce(_rank_input(rank, (SHM_MAX_BYTES // 4 + 1,)))
        after_big = coord.stats()
    assert not coord.is_capturing and not shm.active
    again = coord.all_reduce(x)
    after_exit = coord.stats()
    with coord.graph_replay():
        replayed = coord.all_reduce(x)
    after_replay = coord.stats()

    expected = [
        inputs[0] + inputs[1],
        torch.cat(gathered_inputs, 0),
        torch.cat(gathered_inputs, -1),
        inputs[0] + inputs[1],
    ]
    for name, outs in (("eager", eager), ("captured", captured)):
        for got, want in zip(outs, expected):
            assert got.dtype == want.dtype and torch.equal(got, want), name
    assert torch.allclose(big, _rank_input(0, big.shape) + _rank_input(1, big.shape))
    assert torch.equal(again, expected[0]) and torch.equal(replayed, expected[0])

    buf = torch.full((3,), float(rank))
    coord.broadcast(buf, src=1)
    coord.barrier()
    segment = shm.path
    destroy_distributed()
    return {
        "stats": [after_eager, after_capture, after_big, after_exit, after_replay],
        "broadcast": buf.tolist(),
        "segment": segment,
        "shm_closed": shm.closed,
        "tp_group_after_destroy": parallel_state.get_tp_group(),
    }


def test_both_paths_correct_and_capture_selects_shm(spawn_ranks) -> None:
    results = spawn_ranks(rank_collectives, 2)
    for r in results:
        eager, captured, big, after_exit, after_replay = r["stats"]
        assert eager == {"shm": 0, "torch_dist": 4, "fallbacks": {}}
        assert captured == {"shm": 4, "torch_dist": 4, "fallbacks": {}}
        assert big == {"shm": 4, "torch_dist": 5, "fallbacks": {"message_too_large": 1}}
        assert after_exit == {"shm": 4, "torch_dist": 6, "fallbacks": {"message_too_large": 1}}
        assert after_replay == {"shm": 5, "torch_dist": 6, "fallbacks": {"message_too_large": 1}}
        assert r["broadcast"] == [1.0, 1.0, 1.0]
        assert r["shm_closed"] and r["tp_group_after_destroy"] is None
        assert not os.path.exists(r["segment"])
    assert results[0]["segment"] == results[1]["segment"]
    run_id = os.path.basename(results[0]["segment"])
    assert not [name for name in os.listdir(os.path.dirname(results[0]["segment"])) if run_id in name]


def rank_compiled(rank: int, world: int) -> dict:
    from torch._inductor.compile_fx import compile_fx

    from graphcap.distributed.coordinator import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    coord = init_distributed(timeout_s=60, shm_max_bytes=SHM_MAX_BYTES)
    traced_ops: list[str] = []

    def inductor_recording(gm: torch.fx.GraphModule, example_inputs):
        traced_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    def body(x: torch.Tensor) -> torch.Tensor:
        return coord.all_reduce(x * 2.0) + 1.0

    compiled = torch.compile(body, backend=inductor_recording, fullgraph=True, dynamic=False)
    x = _rank_input(rank, (8, 16))
    expected = (_rank_input(0, x.shape) + _rank_input(1, x.shape)) * 2.0 + 1.0
    eager_out = compiled(x)
    before = coord.stats()
    with coord.graph_capture():
        captured_out = compiled(x)
    after = coord.stats()
    with coord.graph_replay():
        replayed_out = compiled(x)
    after_replay = coord.stats()
    destroy_distributed()
    return {
        "traced_ops": traced_ops,
        "eager_ok": torch.allclose(eager_out, expected),
        "captured_ok": torch.allclose(captured_out, expected),
        "replayed_ok": torch.allclose(replayed_out, expected),
        "before": before,
        "after": after,
        "after_replay": after_replay,
    }


def test_compiled_all_reduce_traces_custom_op_and_takes_shm_in_capture_and_replay(spawn_ranks) -> None:
    for r in spawn_ranks(rank_compiled, 2, timeout_s=300):
        assert any("graphcap.all_reduce" in op for op in r["traced_ops"]), r["traced_ops"]
        assert r["eager_ok"] and r["captured_ok"] and r["replayed_ok"]
        assert (r["before"]["shm"], r["before"]["torch_dist"]) == (0, 1)
        assert (r["after"]["shm"], r["after"]["torch_dist"]) == (1, 1)
        assert (r["after_replay"]["shm"], r["after_replay"]["torch_dist"]) == (2, 1)


def rank_peer_fails(rank: int, world: int, path: str, timeout_s: float) -> None:
    """Rank 1 raises just before the collective; rank 0 must raise within the timeout, not hang."""
    from graphcap.distributed.coordinator import init_distributed

    coord = init_distributed(timeout_s=timeout_s, shm_max_bytes=SHM_MAX_BYTES)
    coord.barrier()
    with coord.graph_capture() if path == "shm" else contextlib.nullcontext():
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        coord.all_reduce(torch.ones(4))


@pytest.mark.parametrize("path", ["torch_dist", "shm"])
def test_failing_rank_makes_peer_raise_not_hang(spawn_ranks_raw, path: str) -> None:
    timeout_s = 3.0
    started = time.monotonic()
    rank0, rank1 = spawn_ranks_raw(rank_peer_fails, 2, args=(path, timeout_s), timeout_s=90)
    assert rank1.error_type == "RuntimeError" and "on purpose" in rank1.error
    assert not rank0.ok, "rank 0 returned although its peer never joined the collective"
    if path == "shm":
        assert rank0.error_type == "ShmTimeoutError" and "rank(s) [1]" in rank0.error
    else:
        assert "on purpose" not in rank0.error, "rank 0 must fail in its own collective"
    assert time.monotonic() - started < 60


def _agree_bucket_verdicts(rank: int, world_size: int) -> list:
    from graphcap.distributed.coordinator import destroy_distributed, init_distributed
    from graphcap.graph.runners.base import agree_across_ranks
    from graphcap.graph.stats import BucketReport

    init_distributed(timeout_s=20, shm_max_bytes=SHM_MAX_BYTES)
    reports = [BucketReport(64, status="graph", min_size=40 + rank),
               BucketReport(128, status="graph" if rank else "eager", reason=None if rank else "bucket_slower_than_eager",
                            min_size=90 - rank)]
    for report in reports:
        agree_across_ranks(report)
    destroy_distributed()
    return [(r.status, r.reason, r.min_size) for r in reports]


def test_bucket_verdicts_and_break_even_sizes_agree_across_ranks(spawn_ranks) -> None:
    """A batch that one rank replays and another runs eagerly would deadlock the collectives: the most
    conservative verdict and the highest break-even size win on every rank."""
    want = [("graph", None, 41), ("eager", "bucket_slower_than_eager", 90)]
    assert spawn_ranks(_agree_bucket_verdicts, 2) == [want, want]
