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
