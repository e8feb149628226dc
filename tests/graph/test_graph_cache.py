"""The graph cache (graphcap/graph/cache.py): a warm start restores every bucket's compiled graph and capture
decision and equals the cold start; every part of the key invalidates; damaged artifacts fall back to a cold
capture of their buckets; an unwritable or full cache directory only turns caching off.

One cold start (a fresh process, module fixture) fills a cache directory; each test that starts the engine again
works on its own copy of it, so every warm start also shows that a copied directory works from its new place.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import graphcap
import graphcap.graph.cache as graph_cache
from graphcap.graph.cache import GraphCache, cache_key, model_digest

pytestmark = pytest.mark.slow

WORKLOAD = Path(__file__).with_name("cache_workload.py")


@dataclass
class Run:
    tokens: list
    stats: dict
    logits: dict[str, torch.Tensor]
    stderr: str


def start(model: Path, cache_dir: Path, out: Path) -> Run:
    """One engine start and the workload (cache_workload.py) in a fresh process, with the graph cache on."""
    env = {k: v for k, v in os.environ.items() if k != graph_cache.SWITCH}  # conftest turns it off for the suite
    proc = subprocess.run([sys.executable, str(WORKLOAD), str(model), str(cache_dir), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    return Run(result["tokens"], result["stats"], load_file(str(out / "logits.safetensors")), proc.stderr)


@pytest.fixture(scope="module")
def cold(llama_ckpt, tmp_path_factory) -> tuple[Path, Run]:
    root = tmp_path_factory.mktemp("graph_cache")
    return root / "cache", start(llama_ckpt.path, root / "cache", root / "out")


@pytest.fixture()
def warm_copy(cold, tmp_path) -> Path:
    """A copy of the cold start's cache directory, somewhere else."""
    dst = tmp_path / "moved" / "cache"
    shutil.copytree(cold[0], dst)
    return dst


def unit_dir(cache_dir: Path, prefix: str) -> Path:
    (path,) = (cache_dir / "graphs").glob(f"*/units/{prefix}*")
    return path


def assert_same_output(run: Run, cold: Run) -> None:
    assert run.tokens == cold.tokens
    for name, logits in cold.logits.items():
        assert torch.equal(run.logits[name], logits), name


def test_cold_start_fills_the_cache(cold) -> None:
    cache_dir, run = cold
    s = run.stats
    assert s["startup"]["cache"] == "cold" and s["startup"]["cache_hits"] == 0
    assert s["decode"]["cache"]["misses"] == {"not_cached": 2} and s["prefill"]["cache"]["misses"] == {"not_cached": 2}
    assert s["graph_cache"]["units_compiled"] == 4  # the shared decode compile and three prefill segment kinds
    assert s["decode"]["replays"] > 0 and s["prefill"]["replays"] > 0
    (manifest,) = (cache_dir / "graphs").glob("*/manifest.json")
    assert set(json.loads(manifest.read_text())["phases"]["decode"]["buckets"]) == {"2", "4"}
    assert "cold start: 0 buckets restored, 4 captured" in run.stderr


def test_warm_start_from_a_copied_directory_equals_the_cold_start(llama_ckpt, cold, warm_copy, tmp_path) -> None:
    run = start(llama_ckpt.path, warm_copy, tmp_path / "out")
    s, cold_stats = run.stats, cold[1].stats
    assert s["startup"]["cache"] == "warm" and s["startup"]["cache_hits"] == 4 and s["startup"]["cache_misses"] == 0
    assert s["startup"]["compile"] == 0 and s["startup"]["verify"] == 0 and s["startup"]["timing"] == 0
    assert s["graph_cache"]["units_loaded"] == 4 and s["graph_cache"]["units_compiled"] == 0
    for phase in ("decode", "prefill"):  # the decisions, with the cold start's figures
        assert s[phase]["buckets"] == cold_stats[phase]["buckets"]
    assert s["decode"]["replays"] > 0 and s["prefill"]["replays"] > 0
    assert_same_output(run, cold[1])
    assert "warm start: 4 buckets restored, 0 captured" in run.stderr


def test_damaged_artifacts_fall_back_to_a_cold_capture_of_their_buckets(llama_ckpt, cold, warm_copy, tmp_path) -> None:
    """A truncated decode artifact and a prefill segment's library with changed bytes: each unit is compiled
    again with a warning, its first bucket captured cold (counted), the outputs stay the cold start's, and the
    entry is whole again for the next start."""
    artifact = unit_dir(warm_copy, "decode_step") / "artifact.bin"
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    (library, *_) = sorted((unit_dir(warm_copy, "prefill_segment_middle") / "inductor").rglob("*.so"))
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))

    run = start(llama_ckpt.path, warm_copy, tmp_path / "out")
    s = run.stats
    assert "cached graph decode_step" in run.stderr and "is unreadable" in run.stderr
    assert "cached graph prefill_segment_middle is unreadable (inductor/" in run.stderr
    # the largest bucket loads first and falls back; the other shares the recompiled code and is restored
    assert s["decode"]["cache"] == {"hits": 1, "misses": {"artifact_unreadable": 1}}
    assert s["prefill"]["cache"]["misses"] == {"artifact_unreadable": 1}
    assert s["graph_cache"]["units_unreadable"] == 2 and s["graph_cache"]["units_compiled"] == 2
    assert s["startup"]["cache"] == "partial"
    assert_same_output(run, cold[1])

    again = start(llama_ckpt.path, warm_copy, tmp_path / "again")
    assert again.stats["startup"]["cache"] == "warm" and again.stats["graph_cache"]["units_loaded"] == 4
    assert_same_output(again, cold[1])


def test_a_full_disk_turns_caching_off_with_one_warning(llama_ckpt, tmp_path, monkeypatch, caplog) -> None:
    from torch._dynamo.aot_compile import AOTCompiledFunction

    from graphcap import LLM

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.delenv(graph_cache.SWITCH)
    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", full)
    with caplog.at_level(logging.WARNING, logger="graphcap"):
        with LLM(str(llama_ckpt.path), cache_dir=str(tmp_path), decode_sizes=[2], graph_prefill="eager",
                 graph_select="always", kv_cache_tokens=512, max_running_requests=2, threads=1) as llm:
            out = llm.generate(prompt_token_ids=[[5, 6, 7], [8, 9]], sampling_params=graphcap.SamplingParams(
                max_new_tokens=4, ignore_eos=True))
            stats = llm.stats()
    warnings = [r.getMessage() for r in caplog.records if "graph cache" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert stats["startup"]["cache"] == "off" and stats["decode"]["captured"] == [2]
    assert all(len(o.token_ids) == 4 for o in out)
    assert not list(tmp_path.glob("graphs/*/manifest.json"))  # nothing half-written for a later start to trust


def test_an_unwritable_cache_directory_turns_caching_off_with_one_warning(tmp_path, monkeypatch, caplog) -> None:
    (tmp_path / "file").write_text("")  # a directory cannot be made under a file (root ignores permission bits)
    monkeypatch.delenv(graph_cache.SWITCH)
    with caplog.at_level(logging.WARNING, logger="graphcap"):
        cache = GraphCache.open(tmp_path / "file" / "cache", {"checkpoint": "x"}, {})
        cache.unit("u").save(lambda path: None)
        cache.record("decode", {"buckets": {}})
        cache.save()
    assert not cache.enabled and cache.decisions("decode") is None
    assert len(caplog.records) == 1 and "graph cache off" in caplog.records[0].getMessage()


# -- the key ---------------------------------------------------------------------------------------------------
def test_every_part_of_the_key_invalidates(monkeypatch, tmp_path) -> None:
    """Each part the key covers changes it, so the cache misses; a changed engine option or checkpoint is a miss
    on an existing directory too."""
    parts = {"checkpoint": "abc", "options": {"page_size": 16}}
    base = cache_key(parts)
    assert cache_key(parts) == base
    assert cache_key({**parts, "checkpoint": "abd"}) != base
    assert cache_key({**parts, "options": {"page_size": 32}}) != base

    fake_cxx = tmp_path / "c++"
    fake_cxx.write_text("#!/bin/sh\necho 'fake c++ 99.0'\n")
    fake_cxx.chmod(0o755)
    changes = {
        "torch": lambda: mock.patch.object(torch, "__version__", "0.0.0"),
        "graphcap": lambda: mock.patch.object(graphcap, "__version__", "0.0.0"),
        "source": lambda: mock.patch.object(graph_cache, "source_digest", lambda: "edited"),
        "compiler": lambda: torch._inductor.config.patch({"cpp.cxx": (None, str(fake_cxx))}),
        "cpu": lambda: mock.patch.object(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER"),
        "inductor env": lambda: mock.patch.dict(os.environ, {"TORCHINDUCTOR_FREEZING": "1"}),
    }
    for name, change in changes.items():
        with change():
            assert cache_key(parts) != base, name
        assert cache_key(parts) == base, name
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # where Inductor caches is not part of it
    assert cache_key(parts) == base

    monkeypatch.delenv(graph_cache.SWITCH)
    cache = GraphCache.open(tmp_path, parts, {})
    cache.record("decode", {"buckets": {"2": {"status": "graph"}}})
    cache.save()
    assert GraphCache.open(tmp_path, parts, {}).decisions("decode") == {"buckets": {"2": {"status": "graph"}}}
    assert GraphCache.open(tmp_path, {**parts, "checkpoint": "abd"}, {}).decisions("decode") is None


def test_the_checkpoint_digest_covers_names_dtypes_shapes_and_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    base = model_digest(model)
    assert model_digest(model) == base
    with torch.no_grad():
        model[0].weight[17, 5] += 1.0  # within the sample of a 4096-value tensor: every value is sampled
    assert model_digest(model) != base
    assert model_digest(model.double()) != model_digest(model.float())
    assert model_digest(nn.Sequential(nn.Linear(64, 32))) != model_digest(nn.Sequential(nn.Linear(32, 64)))
    renamed = nn.Sequential()
    renamed.add_module("other", model[0])
    assert model_digest(renamed) != model_digest(nn.Sequential(model[0]))


def test_engine_options_and_the_checkpoint_are_keyed(llama_ckpt, monkeypatch) -> None:
    from graphcap.config import EngineConfig
    from graphcap.executor.graph_cache import open_graph_cache
    from graphcap.executor.loader import resolve_source
    from graphcap.executor.setup import build_local_runner

    monkeypatch.delenv(graph_cache.SWITCH)
    base = dict(model=str(llama_ckpt.path), kv_cache_tokens=256, threads=1)
    runner = build_local_runner(EngineConfig(**base, graph_decode="eager", graph_prefill="eager"),
                                resolve_source(str(llama_ckpt.path)))

    def key(**options) -> str | None:
        cache = open_graph_cache(EngineConfig(**{**base, **options}), runner, 64)
        return cache.key if cache.enabled else None

    first = key()
    assert key() == first
    assert key(cache_dir="/elsewhere") == first  # where the cache is, is not what it holds
    for option in ({"page_size": 8}, {"inductor_options": {"freezing": True}}, {"max_prefill_padding": 1.5},
                   {"graph_select": "always"}, {"decode_sizes": [1, 2]}, {"kv_cache_tokens": 512}):
        assert key(**option) != first, option
    assert key(graph_cache=False) is None and key(use_cache=False) is None
    with torch.no_grad():
        next(runner.model.parameters()).view(-1)[0] += 1.0
    assert key() != first
