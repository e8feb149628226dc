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


def test_hf_peer_generates_through_eos_as_ignore_eos_does(llama_ckpt) -> None:
    """The peer must treat EOS as we do with ignore_eos: generated like any token, ending nothing. A token
    our greedy run emits early is made the peer's EOS: stopping there, or forbidding it (min_new_tokens),
    would both change its output."""
    from graphcap import LLM, SamplingParams
    from graphcap.bench.e2e import NEW_TOKENS
    from graphcap.bench.peers import _generate_fn, _load_hf

    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, 256, (3, 8), generator=gen).tolist()
    with LLM(str(llama_ckpt.path), kv_cache_tokens=1024, graph_decode="eager", graph_prefill="eager") as llm:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        ours = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    hf = _load_hf(str(llama_ckpt.path), torch.float32)
    hf.generation_config.eos_token_id = ours[0][1]
    assert _generate_fn(hf, {})(prompts) == ours


def test_bench_reduced_precision_reports_source_dtype_and_accuracy_rows(tmp_path, capsys) -> None:
    """--dtype bfloat16 on the tiny preset, eager only: the header names the source and dtype, the floor
    counts 2-byte weights, and a dtype row compares our eager engine with a float32 one (8 eps: see
    tests/test_dtypes.py)."""
    data, stdout = _bench(tmp_path, capsys, "tiny", "--dtype", "bfloat16", "--graph-decode", "eager",
                          "--graph-prefill", "eager")
    assert data["dtype"] == "bfloat16" and data["source"].startswith("preset tiny")
    assert "model tiny (preset tiny" in stdout and "dtype bfloat16" in stdout
    (floor,) = [r for r in data["results"] if r["phase"] == "floor"]
    assert floor["mode"].startswith("engine weights (bfloat16)")
    params = 16 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64) + 2 * 1024 * 64 + 64  # tiny, untied
    assert floor["weight_mb"] == pytest.approx((params - 1024 * 64) * 2 / 1e6)  # embedding rows not read whole
    (row,) = [r for r in data["results"] if r["phase"] == "dtype"]
    assert row["mode"] == "eager" and row["dtype"] == "bfloat16" and row["graph_steps"] == 0
    assert 0 < row["rel_err"] <= 8 * torch.finfo(torch.bfloat16).eps
    assert row["rows"] > 0 and row["prompts"] == 4
    assert "Reduced precision against float32" in stdout
    assert [m for m, _ in data["stage_seconds"]][0] == "building the eager engine"


@pytest.mark.slow
@pytest.mark.real_model
def test_bench_smollm2_peer_and_floor_on_the_real_weights(tmp_path, capsys) -> None:
    """smollm2 eager with the HF peer: HF reads the same GGUF and generates the same tokens (one request's
    greedy path emits EOS midway, which neither side may act on), every request makes all its tokens, and
    the floor counts the dequantised float32 weights and the file's blocks as stored."""
    from graphcap.bench.e2e import NEW_TOKENS, NUM_REQUESTS
    from graphcap.checkpoints.smollm2 import smollm2_gguf_path

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "smollm2", "--graph-decode", "eager", "--graph-prefill", "eager",
                 "--quantization", "none",  # the weights HF computes on, so the floor counts float32
                 "--batch-sizes", "1", "--iters", "1", "--e2e-iters", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    path = smollm2_gguf_path()
    assert data["source"] == str(path) and data["dtype"] == "float32"
    e2e = [r for r in data["results"] if r["phase"] in ("e2e", "peer")]
    assert [r["phase"] for r in e2e] == ["e2e", "peer"]
    for r in e2e:
        assert r["tokens_equal"] is True and r["generated_tokens"] == NUM_REQUESTS * NEW_TOKENS, r
    engine, stored = [r for r in data["results"] if r["phase"] == "floor"]
    assert engine["weight_mb"] == pytest.approx(134_515_008 * 4 / 1e6)  # tied: the table is the LM head
    assert stored["mode"].startswith("gguf blocks (Q4_1+Q8_0")
    assert 0.9 * path.stat().st_size / 1e6 < stored["weight_mb"] < path.stat().st_size / 1e6
