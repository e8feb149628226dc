"""The compiled-artifact cache: a warm start loads what a cold one compiled, a changed key never sees old
artifacts, and a disabled cache neither reads nor writes."""

from __future__ import annotations

import pytest

from graphcap import LLM, SamplingParams
from graphcap.cli import build_parser, engine_kwargs
from graphcap.compilation.cache import ArtifactCache, cache_key
from graphcap.compilation.config import CompilationConfig, PassConfig
from graphcap.compilation.pass_manager import PostGradPassManager
from graphcap.compilation.passes.noop_elimination import NoOpEliminationPass
from graphcap.config import config_from_kwargs


def _key(config: CompilationConfig = CompilationConfig(), model: str = "m") -> str:
    return cache_key(model, config, PostGradPassManager(config.pass_config).uuid())


def test_key_changes_with_pass_and_config_values() -> None:
    base = _key()
    assert _key() == base
    assert _key(CompilationConfig(pass_config=PassConfig(enable_noop=False))) != base
    assert _key(CompilationConfig(backend="eager")) != base
    assert _key(model="other model config") != base
    # where the cache lives, and whether it is used, are not part of the key
    assert _key(CompilationConfig(cache_dir="/elsewhere", use_cache=False)) == base


def test_key_changes_when_a_pass_is_edited(monkeypatch) -> None:
    base = _key()
    monkeypatch.setattr(NoOpEliminationPass, "uuid", lambda self: "edited source")
    assert _key() != base


def test_disabled_cache_writes_nothing(tmp_path) -> None:
    cache = ArtifactCache(tmp_path / "c", "k", enabled=False)
    with cache.compiling():
        pass
    cache.record("piece", {"p": 1}, 1.0)
    assert not (tmp_path / "c").exists()


def test_cli_cache_flags_reach_the_compilation_config(tmp_path) -> None:
    args = build_parser().parse_args(["generate", "--model", "tiny", "--prompt-ids", "1", "--no-cache",
                                      "--cache-dir", str(tmp_path), "--compilation-config",
                                      '{"pass_config": {"enable_noop": false}}'])
    cc = config_from_kwargs("tiny", engine_kwargs(args)).compilation()
    assert cc.use_cache is False and cc.cache_dir == str(tmp_path)
    assert cc.pass_config.enable_noop is False


COMMON = dict(graph_decode="piecewise", graph_prefill="eager", decode_sizes=[2], graph_select="always", max_running_requests=2,
              kv_cache_tokens=256, max_model_len=64)


@pytest.mark.slow
def test_second_start_loads_instead_of_compiling(llama_ckpt, tmp_path) -> None:
    cold = LLM(str(llama_ckpt.path), cache_dir=str(tmp_path), **COMMON)
    cold_stats = cold.stats()["compile"]
    cold.shutdown()
    warm = LLM(str(llama_ckpt.path), cache_dir=str(tmp_path), **COMMON)
    warm_stats = warm.stats()["compile"]
    warm.shutdown()
    assert cold_stats["cache"] == "miss" and cold_stats["compiled"] == 3
    assert warm_stats["cache"] == "hit" and warm_stats["loaded"] == 3 and warm_stats["compiled"] == 0
    assert warm_stats["passes"] == cold_stats["passes"]
    assert cold_stats["compile_seconds"] >= 3 * warm_stats["compile_seconds"]
    other = LLM(str(llama_ckpt.path), cache_dir=str(tmp_path), use_cache=False, **COMMON)
    assert other.stats()["compile"]["cache"] == "off"
    other.shutdown()
    assert len(list(tmp_path.iterdir())) == 1  # only the first key's directory


@pytest.mark.slow
def test_fp8_piecewise_runs_the_passes_and_matches_eager(llama_ckpt, tmp_path) -> None:
    prompts = [[5, 17, 33, 9], [100, 7]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    common = dict(COMMON, quantization="fp8", graph_verify="off")
    with LLM(str(llama_ckpt.path), cache_dir=str(tmp_path), **common) as llm:
        got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        stats = llm.stats()
    with LLM(str(llama_ckpt.path), quantization="fp8", **dict(COMMON, graph_decode="eager")) as eager:
        want = [o.token_ids for o in eager.generate(prompt_token_ids=prompts, sampling_params=params)]
    # the passes ran on the pieces (the cache was cold): each RMSNorm feeding a quantised linear fused, one in
    # the first piece, two in the middle one, one in the last (test_piecewise_fp8 checks the graphs)
    assert stats["compile"]["cache"] == "miss" and stats["compile"]["passes"]["fix_functionalization"] > 0
    assert stats["compile"]["passes"]["rms_quant_fusion"] == 4
    assert stats["decode"]["replays"] > 0
    assert got == want
