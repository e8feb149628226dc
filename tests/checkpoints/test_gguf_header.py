"""The cached GGUF header gives exactly what `gguf.GGUFReader` gives, and a changed file is parsed again."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from graphcap.checkpoints import gguf_header
from graphcap.checkpoints.gguf import GGUFCheckpoint

from .gguf_files import write_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_header, "default_cache_dir", lambda: tmp_path / "cache")
    return tmp_path / "cache" / "gguf-headers"


def test_cached_header_equals_the_readers(tmp_path, kit, cache, monkeypatch):
    path = write_gguf(kit.build_hf("llama_gqa", seed=1), tmp_path / "m.gguf", Q.Q4_1)
    parsed = gguf_header.read_header(path)
    assert len(list(cache.iterdir())) == 1
    monkeypatch.setattr(gguf_header, "_parse", lambda p: pytest.fail("a cache hit must not parse"))
    cached = gguf_header.read_header(path)
    assert cached[0] == parsed[0]
    for a, b in zip(cached[1], parsed[1], strict=True):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, b.shape)
        assert np.array_equal(a.data, b.data) and a.data.dtype == b.data.dtype
    assert dict(GGUFCheckpoint(path).tensors()).keys()  # loads through the cached header


def test_a_changed_file_or_a_bad_cache_entry_is_parsed_again(tmp_path, kit, cache):
    path = write_gguf(kit.build_hf("llama_gqa", seed=1), tmp_path / "m.gguf", Q.Q8_0)
    gguf_header.read_header(path)
    (entry,) = cache.iterdir()
    entry.write_text("{not json")
    assert gguf_header.read_header(path)[1]  # the reader again, and the entry rewritten
    write_gguf(kit.build_hf("llama_gqa", seed=2), path, Q.Q4_0)
    os.utime(path, ns=(1, 1))
    metadata, tensors = gguf_header.read_header(path)
    assert {t.tensor_type for t in tensors if len(t.shape) == 2} == {Q.Q4_0}
    assert len(list(cache.iterdir())) == 2
