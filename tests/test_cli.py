"""The command line: user mistakes exit 2 with exactly one `graphcap: error: ...` line and no traceback;
the happy paths print what the API returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from graphcap import LLM, SamplingParams
from graphcap.cli import main


# The engine defaults to graphs; these tests are about the CLI, not capture.
EAGER = ("--graph-decode", "eager", "--graph-prefill", "eager")

def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, match: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("graphcap: error: ") and match in lines[0], lines[0]
    assert "Traceback" not in err


def test_missing_checkpoint(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "/no/such/ckpt", "--prompt-ids", "1")
    assert_user_error(code, err, "neither a preset")


def test_malformed_checkpoint(capsys, ckpt_copy):
    (ckpt_copy / "config.json").write_text("{oops")
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt_copy), "--prompt-ids", "1")
    assert_user_error(code, err, "not valid JSON")


def test_pickle_only_checkpoint(capsys, ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt_copy), "--prompt-ids", "1")
    assert_user_error(code, err, "Convert")


def test_unsupported_architecture(capsys, ckpt_copy, kit):
    kit.edit_config(ckpt_copy, architectures=["FalconForCausalLM"])
    code, _, err = run_cli(capsys, "generate", "--model", str(ckpt_copy), "--prompt-ids", "1")
    assert_user_error(code, err, "unsupported architecture 'FalconForCausalLM'")


@pytest.mark.parametrize("extra, match", [
    (["--prompt-ids", ",".join(["5"] * 256)], "context holds at most"),
    (["--prompt-ids", "5,256"], "outside the vocabulary"),
    (["--prompt-ids", "-1"], "outside the vocabulary"),
    (["--prompt-ids", "5", "--temperature", "-1"], "temperature"),
    (["--prompt-ids", "5", "--top-p", "0"], "top_p"),
    (["--prompt-ids", "5", "--top-p", "1.5"], "top_p"),
    (["--prompt-ids", "5", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "hello"], "no tokenizer"),
    (["--prompt-ids", "5", "--kv-cache-tokens", "0"], "kv_cache_tokens"),
])
def test_bad_inputs(capsys, llama_ckpt, extra, match):
    code, out, err = run_cli(capsys, "generate", "--model", str(llama_ckpt.path), *EAGER, *extra)
    assert_user_error(code, err, match)
    assert out == ""


def test_empty_text_prompt(capsys, nobos_ckpt):
    code, _, err = run_cli(capsys, "generate", "--model", str(nobos_ckpt.path), *EAGER, "--prompt", "")
    assert_user_error(code, err, "empty")


def test_generate_json(capsys, llama_ckpt):
    code, out, err = run_cli(capsys, "generate", "--model", str(llama_ckpt.path), *EAGER, "--prompt-ids", "5,6,7",
                             "--max-new-tokens", "6", "--ignore-eos", "--json", "--kv-cache-tokens", "256")
    assert code == 0 and err == ""
    data = json.loads(out)
    with LLM(str(llama_ckpt.path), kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as llm:
        want = llm.generate(prompt_token_ids=[[5, 6, 7]],
                            sampling_params=SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert data["token_ids"] == want.token_ids
    assert data["finish_reason"] == "length" and data["text"] is None
    assert data["stats"]["generated_tokens"] == 6 and data["stats"]["requests"] == 1


def test_generate_text_prompt(capsys, tokenized_ckpt):
    code, out, _ = run_cli(capsys, "generate", "--model", str(tokenized_ckpt.path), *EAGER, "--prompt", "the cat sat",
                           "--max-new-tokens", "5", "--ignore-eos", "--kv-cache-tokens", "256")
    assert code == 0
    with LLM(str(tokenized_ckpt.path), kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as llm:
        want = llm.generate(prompts="the cat sat", sampling_params=SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert out.strip() == want[0].text.strip() and out.strip()


def _python_m(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "graphcap", *argv], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.slow  # a fresh interpreter importing torch: several seconds on a busy machine
def test_python_m_graphcap_happy_path(llama_ckpt):
    proc = _python_m("generate", "--model", str(llama_ckpt.path), *EAGER, "--prompt-ids", "5,6,7", "--max-new-tokens",
                     "4", "--ignore-eos", "--json", "--kv-cache-tokens", "256")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["token_ids"]) == 4 and data["finish_reason"] == "length"


def test_python_m_graphcap_user_error_has_no_traceback(tmp_path):
    proc = _python_m("generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1")
    assert_user_error(proc.returncode, proc.stderr, "neither a preset")
    assert proc.stdout == ""


def test_every_engine_option_is_a_flag_with_help():
    """The flags are generated from EngineConfig: each field has one, with help, and it reaches the config."""
    import dataclasses

    from graphcap.cli import build_parser, engine_kwargs
    from graphcap.config import EngineConfig, config_from_kwargs

    parser = build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    by_dest = {a.dest: a for a in gen._actions}
    for f in dataclasses.fields(EngineConfig):
        if f.name in ("model", "extra"):
            continue
        assert f.name in by_dest, f"no flag for {f.name}"
        assert by_dest[f.name].help, f"the flag for {f.name} has no help"
    args = parser.parse_args(["generate", "--model", "tiny", "--prompt-ids", "1", "--page-size", "8",
                              "--max-model-len", "64", "--max-prefill-padding", "1.5", "--decode-attention", "opaque",
                              "--max-decode-batch-size", "4", "--no-cpu-kernels", "--tp", "1",
                              "--inductor-options", '{"freezing": true}'])
    cfg = config_from_kwargs("tiny", engine_kwargs(args))
    assert (cfg.page_size, cfg.max_model_len, cfg.max_prefill_padding, cfg.decode_attention) == (8, 64, 1.5, "opaque")
    assert cfg.max_decode_batch_size == 4 and cfg.cpu_kernels is False and cfg.inductor_options == {"freezing": True}


def test_bench_serve_has_its_own_flags(capsys):
    """`graphcap bench serve` takes the load generator's flags (no --model needed), `graphcap bench` its own."""
    from graphcap.cli import parse_args

    code, _, err = run_cli(capsys, "bench", "serve", "--url", "ftp://nowhere")
    assert_user_error(code, err, "--url must start with http:// or https://")
    code, _, err = run_cli(capsys, "bench", "serve", "--url", "http://127.0.0.1:1", "--requests", "1")
    assert_user_error(code, err, "cannot reach http://127.0.0.1:1")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--concurrency", "0"])
    assert exc.value.code == 2 and "--concurrency" in capsys.readouterr().err
    args = parse_args(["-v", "bench", "serve", "--concurrency", "3", "--json", "out.json"])
    assert (args.verbose, args.concurrency, args.json, args.url) == (True, 3, "out.json", "http://127.0.0.1:8000")
    assert parse_args(["bench", "--model", "tiny"]).func.__name__ == "cmd_bench"


def _fake_cache_entry(root, checkpoint: str) -> str:
    """A graph cache entry without compiling anything: one unit of 4 KiB and one decision."""
    from graphcap.graph.cache import GraphCache

    cache = GraphCache.open(root, {"checkpoint": checkpoint}, {"model": f"model-{checkpoint}"})
    unit = cache.unit("step")
    with unit.compiling():
        pass
    unit.save(lambda path: (path / "artifact.bin").write_bytes(b"x" * 4096))
    cache.record("decode", {"buckets": {"2": {"status": "graph"}, "4": {"status": "eager"}}})
    cache.save()
    return cache.key


def test_cache_ls_and_rm(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHCAP_GRAPH_CACHE")  # conftest turns the graph cache off for the suite
    first, second = _fake_cache_entry(tmp_path, "a"), _fake_cache_entry(tmp_path, "b")
    where = ("--cache-dir", str(tmp_path))
    code, out, _ = run_cli(capsys, "cache", "ls", *where)
    assert code == 0 and out.splitlines()[-1] == "2 entries, 0.0 MiB"
    assert any(line.startswith(first) and "model-a" in line and "graphs: decode 1" in line for line in out.splitlines())
    code, _, err = run_cli(capsys, "cache", "rm", *where)
    assert_user_error(code, err, "needs entry keys")
    code, _, err = run_cli(capsys, "cache", "rm", "zzz", *where)
    assert_user_error(code, err, "matches 0 cache entries")
    code, out, _ = run_cli(capsys, "cache", "rm", first[:8], *where)
    assert code == 0 and out.startswith("removed 1 entries")
    code, out, _ = run_cli(capsys, "cache", "ls", *where)
    assert first not in out and second in out
    code, out, _ = run_cli(capsys, "cache", "rm", "--all", *where)
    assert code == 0 and out.startswith("removed 1 entries")
    assert run_cli(capsys, "cache", "ls", *where)[1] == "0 entries, 0.0 MiB\n"


def test_warmup_needs_the_graph_cache(capsys):
    code, _, err = run_cli(capsys, "warmup", "--model", "tiny")  # GRAPHCAP_GRAPH_CACHE=0 (conftest)
    assert_user_error(code, err, "the graph cache is off")


@pytest.mark.slow
def test_warmup_fills_the_graph_cache(capsys, tmp_path, monkeypatch, llama_ckpt):
    """`graphcap warmup` leaves what a later start with the same engine options restores."""
    monkeypatch.delenv("GRAPHCAP_GRAPH_CACHE")
    argv = ("warmup", "--model", str(llama_ckpt.path), "--cache-dir", str(tmp_path), "--graph-prefill", "eager",
            "--decode-sizes", "2", "--graph-select", "always", "--kv-cache-tokens", "512",
            "--max-running-requests", "2", "--threads", "1")
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "cold start" in out and "0 buckets restored, 1 captured" in out
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "warm start" in out and "1 buckets restored, 0 captured" in out
    code, out, _ = run_cli(capsys, "cache", "ls", "--cache-dir", str(tmp_path))
    assert str(llama_ckpt.path) in out and "graphs: decode 1" in out and "1 entries" in out
