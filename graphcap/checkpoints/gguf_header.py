"""A GGUF file's header (metadata and tensor table), parsed once by the `gguf` package and kept as JSON in
graphcap's cache directory.

`gguf.GGUFReader` builds a field object for every tokenizer string and merge, which takes about 2 s for
SmolLM2's 49k-token vocabulary here: most of a warm start whose graphs restore in under one. The JSON copy
loads in tens of milliseconds; tensors are then memory-mapped straight from the file at the offsets the
reader found. The key is the file's resolved path, size and modification time and the `gguf` package's
version, so a changed file or reader is a miss; an unreadable or unwritable cache only costs the parse.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from graphcap.common.digest import default_cache_dir, digest_of

FORMAT = 1  # bump when the JSON layout changes


@dataclass(frozen=True)
class TensorInfo:
    """What graphcap reads of a GGUF tensor: the reader's name, type and shape (GGUF order, fastest
    dimension first), and where its bytes lie, as the array the reader would give."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    path: Path
    offset: int
    dtype: str
    data_shape: tuple[int, ...]

    @property
    def data(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=self.data_shape)


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata, tensors) of the GGUF file at `path`; the reader's errors propagate on a cache miss."""
    stat = path.stat()
    key = digest_of({"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                     "gguf": version("gguf"), "format": FORMAT})
    cache_file = default_cache_dir() / "gguf-headers" / f"{key}.json"
    try:
        return _from_json(json.loads(cache_file.read_text()), path)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    metadata, tensors = _parse(path)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_to_json(metadata, tensors)))
        tmp.replace(cache_file)
    except OSError:
        pass  # a read-only or full cache directory: the next start parses again
    return metadata, tensors


def _parse(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = [TensorInfo(t.name, t.tensor_type, tuple(int(d) for d in t.shape), path, int(t.data_offset),
                          t.data.dtype.str, tuple(int(d) for d in t.data.shape)) for t in reader.tensors]
    return metadata, tensors


def _to_json(metadata: dict[str, Any], tensors: list[TensorInfo]) -> dict:
    return {"metadata": metadata, "tensors": [[t.name, int(t.tensor_type), list(t.shape), t.offset, t.dtype,
                                               list(t.data_shape)] for t in tensors]}


def _from_json(data: dict, path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    from gguf import GGMLQuantizationType

    tensors = [TensorInfo(name, GGMLQuantizationType(kind), tuple(shape), path, offset, dtype, tuple(data_shape))
               for name, kind, shape, offset, dtype, data_shape in data["tensors"]]
    return dict(data["metadata"]), tensors
