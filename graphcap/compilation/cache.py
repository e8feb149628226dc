"""The compiled-artifact cache: one directory per key under `cache_dir`.

Inductor's own FX-graph and AOT-autograd caches do the storing; graphcap points them at the key's
directory while it compiles, so a key that changed can never see another key's artifacts. Beside them a
manifest records what was compiled and the pass match counts, because a cache hit skips the post-grad
passes and could not report them otherwise.

The key hashes everything that changes compiled code: the model configuration, the compilation config, the
pass manager (which hashes the passes' source), the torch version and graphcap's own source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from graphcap.common.digest import default_cache_dir, source_digest
from graphcap.common.environ import environ
from graphcap.compilation.config import CompilationConfig

MANIFEST = "manifest.json"


def cache_key(model_digest: str, config: CompilationConfig, pass_uuid: str) -> str:
    parts = [model_digest, config.digest(), pass_uuid, torch.__version__, source_digest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class ArtifactCache:
    """Where one key's artifacts live, and its manifest. Disabled, it reads and writes nothing: compiles
    run with Inductor's caches off."""

    def __init__(self, root: str | Path | None, key: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.key = key
        self.dir = Path(root or default_cache_dir()).expanduser() / key
        self.entries: dict[str, dict] = {}
        if enabled:
            self.entries = self._read_manifest()

    def _read_manifest(self) -> dict[str, dict]:
        try:
            data = json.loads((self.dir / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        if data.get("key") != self.key or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def lookup(self, entry: str) -> dict | None:
        return self.entries.get(entry)

    def record(self, entry: str, passes: dict[str, int], seconds: float) -> None:
        """Note a freshly compiled artifact; written to disk at once so an interrupted start keeps it."""
        if not self.enabled:
            return
        self.entries[entry] = {"passes": passes, "seconds": round(seconds, 3)}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"key": self.key, "torch": torch.__version__, "entries": self.entries}, indent=1))
        tmp.replace(self.dir / MANIFEST)

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Compile inside this block: Inductor's caches read and write this key's directory, or are off."""
        if not self.enabled:
            with (
                torch._inductor.config.patch(fx_graph_cache=False),
                torch._functorch.config.patch(enable_autograd_cache=False),
            ):
                yield
            return
        inductor_dir = self.dir / "inductor"
        inductor_dir.mkdir(parents=True, exist_ok=True)
        with (
            environ("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir)),
            torch._inductor.config.patch(fx_graph_cache=True),
            torch._functorch.config.patch(enable_autograd_cache=True),
        ):
            yield
