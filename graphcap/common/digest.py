"""Stable hashes for cache keys and cross-rank agreement: one way to hash a description, one way to hash
graphcap's own source."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def digest_of(obj: Any, length: int = 16) -> str:
    """SHA-256 of a JSON-able description (keys sorted; dtypes, devices and paths become strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@functools.cache
def source_digest() -> str:
    """Hash of every graphcap source file, Python and C++ (the kernels): an edit anywhere in the engine can
    change traced graphs, or how fast they run against eager."""
    h = hashlib.sha256()
    for path in sorted(p for p in PACKAGE_ROOT.rglob("*") if p.suffix in (".py", ".cpp", ".h")):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """The user's cache directory for graphcap (compiled artifacts, built kernels)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("graphcap"))
