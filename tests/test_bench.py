"""`graphcap bench` end to end through the CLI (JSON schema, every phase present) and the honesty rules that
keep a fallback from passing as a graph number."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from graphcap.bench.report import format_tables, make_row
from graphcap.bench.steps import measure_pair
from graphcap.cli import main
from graphcap.graph.verify import interleaved_timings

CORE = {"phase", "mode", "batch_size", "ms_median", "speedup_vs_eager", "max_abs_diff", "tokens_equal"}
TOP = {"device", "torch", "model", "startup_seconds", "results", "compile"}


def _bench(tmp_path, capsys, model: str, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", model, "--batch-sizes", "1", "--iters", "2", "--e2e-iters", "1", "--no-hf",
                 "--json", str(out), *flags])
    assert code == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_bench_eager_smoke_writes_schema_and_table(tmp_path, capsys, llama_ckpt) -> None:
    """Eager only, plus a prefill mode no engine has: it must become a note, never a row or a crash."""
    data, stdout = _bench(tmp_path, capsys, str(llama_ckpt.path), "--graph-decode", "eager",
                          "--graph-prefill", "eager,no-such-mode", "--threads", "1")
    assert TOP <= set(data)
    rows = data["results"]
    for row in rows:
        assert CORE <= set(row), row
    by_phase = Counter(r["phase"] for r in rows)
    assert by_phase["decode"] == 1 and by_phase["prefill"] == 3 and by_phase["e2e"] == 1 and by_phase["floor"] == 1
    assert "peer" not in by_phase  # --no-hf
    for row in rows:
        if row["phase"] in ("decode", "prefill", "e2e"):
            assert row["speedup_vs_eager"] == pytest.approx(1.0) and row["ms_median"] > 0
    prefill = [r for r in rows if r["phase"] == "prefill"]
    assert [r["tokens"] for r in prefill] == [128, 128, 408]
    assert all(r["replays"] == 0 and r["fallbacks"] == 0 for r in prefill)
    e2e = next(r for r in rows if r["phase"] == "e2e")
    assert e2e["tokens_equal"] is True and e2e["tokens_per_s"] > 0
    floor = next(r for r in rows if r["phase"] == "floor")
    assert floor["bandwidth_gbps"] > 0 and floor["weight_mb"] > 0
    assert data["startup_seconds"].keys() == {"eager"}
    assert data["timing"] == {"iters": 2, "steps_per_turn": 4}
    assert data["engine"]["attention_kernel"] in ("cpp", "torch")
    assert f"attention kernels: {data['engine']['attention_kernel']}" in stdout
    assert "Decode step latency" in stdout and "Prefill step latency" in stdout and "tokens/s" in stdout
    assert not any(r["mode"] == "no-such-mode" for r in rows)
    assert any("graph_prefill=no-such-mode" in n for n in data["notes"]) and "no-such-mode" in stdout


class _FallbackRunner:
    """A model runner whose graph path always falls back to eager, counting it as ModelRunner does."""

    def __init__(self) -> None:
        self.eager_steps = Counter()
        self.rejects = Counter()

    def forward(self, batch):
        self.eager_steps["decode"] += 1
        self.rejects["batch_too_large"] += 1
        return self.forward_eager(batch)

    def forward_eager(self, batch):
        return torch.tensor([[0.0, 1.0, 0.5]])


class _FakeLLM:
    def __init__(self) -> None:
        self.runner = _FallbackRunner()

    def stats(self) -> dict:
        return {"eager_steps": dict(self.runner.eager_steps),
                "decode": {"replays": 0, "rejects": dict(self.runner.rejects)}}


def test_a_fallback_is_counted_and_shown_never_passed_as_a_replay() -> None:
    pair = measure_pair(_FakeLLM(), "decode", batch=None, iters=3)
    assert pair.replays == 0
    assert pair.fallbacks == 3 + 2  # check call + warm-up + timed iterations
    assert pair.fallback_reasons == {"batch_too_large": 5}
    row = make_row("decode", "full", 32, pair.graph_ms, pair.speedup, pair.max_abs_diff, pair.tokens_equal,
                   replays=pair.replays, fallbacks=pair.fallbacks, fallback_reasons=pair.fallback_reasons)
    assert "0/5 (batch_too_large)" in format_tables([row])


def test_turns_alternate_and_report_the_mean_step_of_each_turn(monkeypatch) -> None:
    """Turns of k consecutive calls, A B A B after one warm-up call each; each turn's time is divided by k."""
    calls: list[str] = []
    clock = iter(range(1000))
    monkeypatch.setattr("graphcap.graph.verify.time.perf_counter", lambda: next(clock) / 1e3)
    ta, tb = interleaved_timings(lambda: calls.append("a"), lambda: calls.append("b"), iters=2, steps_per_turn=3)
    assert "".join(calls) == "ab" + "aaabbb" * 2
    assert ta == tb == [pytest.approx(1 / 3)] * 2  # one clock tick per turn, spread over its 3 steps


def test_fallbacks_are_counted_over_every_step_of_every_turn() -> None:
    pair = measure_pair(_FakeLLM(), "decode", batch=None, iters=3, steps_per_turn=4)
    assert pair.fallbacks == 3 * 4 + 2


@pytest.mark.parametrize("flag", ["--steps-per-turn", "--iters", "--e2e-iters"])
def test_bench_refuses_a_non_positive_count(flag, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", "tiny", flag, "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_full_decode_replays_and_matches_eager(tmp_path, capsys, llama_ckpt) -> None:
    data, stdout = _bench(tmp_path, capsys, str(llama_ckpt.path), "--graph-decode", "full", "--decode-sizes", "1",
                          "--graph-select", "always")
    decode = {r["mode"]: r for r in data["results"] if r["phase"] == "decode"}
    assert decode.keys() == {"eager", "full"}
    full = decode["full"]
    assert full["replays"] > 0 and full["fallbacks"] == 0
    assert full["tokens_equal"] is True and full["max_abs_diff"] < 1e-3
    assert full["speedup_vs_eager"] == pytest.approx(full["eager_ms"] / full["ms_median"])
    e2e = {r["mode"]: r for r in data["results"] if r["phase"] == "e2e"}
    assert e2e["full"]["tokens_equal"] is True
    assert data["compile"]["full"]["decode"]["captured"] == [1]
    assert data["startup_seconds"]["full"] > 0
