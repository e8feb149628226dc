"""The graph cache: what a warm start restores instead of capturing again.

A cold start leaves, under `<cache dir>/graphs/<key>/`, the compiled code of every compile the graph
runners made (a *unit*: the decode step's shared compile, one prefill segment kind) and every bucket's
capture decision (verdict, reason, timings, break-even size, verification figures, eager's own error). A
warm start loads the units instead of compiling, takes the decisions instead of verifying and timing again,
and checks each unit it loads once, cheaply, against eager (graph/runners/base.py).

Why these mechanisms (measured on `tiny`, decode step of a 16-bucket shared compile, fresh process):
`torch.compile(...).aot_compile` saves the traced and compiled function, and `load_compiled_function`
restores it in 0.3-0.5 s without Dynamo tracing the model again. Inductor's own caches re-trace at every
start: its FX-graph and AOT-autograd caches 3.4-5 s, the mega-cache bytes of `save_cache_artifacts` 4.3 s.
None of these serialisations carries the C++ library Inductor built (a load without it builds it again,
19-21 s), so each unit keeps the Inductor cache directory it was compiled in beside its artifact.

The key covers everything compiled code and decisions depend on: the checkpoint's content (each tensor's
name, dtype, shape and a sample of its values), the engine configuration, torch, Python and graphcap's
version and source, the C++ compiler, the CPU's model and instruction-set flags, and Inductor's environment
variables. Nothing in an entry names its own location, so a copied cache directory works where it lands.

Layout of an entry:
  manifest.json         the decisions per phase and bucket; the units, with each file's size and SHA-256
                        (a changed, truncated or missing file makes its unit unreadable, never wrong)
  units/<name>/         artifact.bin (the serialised compiled code) and whatever the backend saves beside
                        it; inductor/, the Inductor cache directory the unit was compiled in
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from graphcap.common.digest import default_cache_dir, digest_of, source_digest
from graphcap.common.environ import environ

log = logging.getLogger("graphcap")

T = TypeVar("T")

FORMAT = 1
MANIFEST = "manifest.json"
ARTIFACT = "artifact.bin"
# GRAPHCAP_GRAPH_CACHE=0 turns graph caching off for a process whatever the engine options say.
SWITCH = "GRAPHCAP_GRAPH_CACHE"
# Values sampled per tensor for the checkpoint's content digest: a changed checkpoint changes nearly every
# value, and hashing a sample keeps a warm start from reading every weight twice.
SAMPLE_VALUES = 4096
# Inductor and Dynamo environment variables configure compiled code; those naming cache locations do not.
_ENV_PREFIXES = ("TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE_")
_ENV_IGNORED = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE")


def model_digest(model: nn.Module) -> str:
    """The loaded checkpoint's content: every state tensor's name, dtype and shape, and an evenly spaced
    sample of its bytes (at most SAMPLE_VALUES values per tensor)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLE_VALUES)].contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compiler_identity() -> str:
    """The C++ compiler Inductor builds with, and its version."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except Exception as e:  # no compiler: nothing compiles, and the key says so
        return f"none ({type(e).__name__})"
    return f"{compiler}: {_compiler_version(compiler)}"


def cpu_identity() -> str:
    """The CPU's model and instruction-set flags (compiled code may use any instruction the CPU has)."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.strip()
                if model and flags:
                    break
    except OSError:
        model = platform.processor()
    return f"{platform.machine()} | {model} | {torch.backends.cpu.get_cpu_capability()} | {flags}"


def environment() -> dict[str, object]:
    """The parts of the key that come from the installation and the machine, not from the engine."""
    import graphcap

    return {
        "torch": torch.__version__,
        "python": sys.version,
        "graphcap": graphcap.__version__,
        "source": source_digest(),
        "compiler": compiler_identity(),
        "cpu": cpu_identity(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES) and k not in _ENV_IGNORED},
    }


def cache_key(parts: dict) -> str:
    """The entry for these engine-specific parts (model digest, configuration) on this installation."""
    return digest_of({"format": FORMAT, **parts, **environment()}, length=24)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _inductor_dir(path: Path) -> Iterator[None]:
    """Inductor reads and writes `path` as its cache directory inside the block. Its in-memory caches of
    loaded libraries are cleared first, so that a compile writes every library its code needs into `path`
    (rather than reusing one another unit built) and a load reads them from there."""
    from torch._inductor.utils import clear_caches

    clear_caches()
    with environ("TORCHINDUCTOR_CACHE_DIR", str(path)):
        yield


def switched_off() -> bool:
    return os.environ.get(SWITCH, "1") == "0"


@functools.cache
def _compiler_version(compiler: str) -> str:
    from torch._inductor.cpp_builder import get_compiler_version_info

    return get_compiler_version_info(compiler)


_prefetch: threading.Thread | None = None


def prefetch(root: str | Path | None = None) -> None:
    """Start computing, on a background thread, what loading cached graphs needs and would cost a second or
    more per process in line: the vector ISAs Inductor may use, torch's source hash (Inductor checks every
    artifact against it) and the compiler's version. The engine calls this before loading the weights, so
    that it overlaps with them; `GraphCache.open` waits for it."""
    global _prefetch
    if _prefetch is None and not switched_off():
        base = Path(root or default_cache_dir()).expanduser() / "graphs"
        _prefetch = threading.Thread(target=_warm_up, args=(base,), name="graphcap-cache-prefetch", daemon=True)
        _prefetch.start()


def _warm_up(base: Path) -> None:
    from torch._inductor.codecache import torch_key

    try:
        compiler_identity()
        _known_isa_verdicts(base)
        torch_key()
    except Exception:  # whatever failed here fails again, and is reported, where it is needed
        log.debug("graph cache prefetch failed", exc_info=True)


def _known_isa_verdicts(base: Path) -> None:
    """Let Inductor find its usable vector ISAs from verdicts recorded on this machine before.

    Inductor decides which ISAs (and some of their features) it may use by building a test library for each
    and loading it in a subprocess: ten probes, a second per process. A verdict depends only on the ISA's
    flags, the test code, the compiler, the CPU and torch's headers, so it is recorded under a key of the
    last three (`vec_isa-<key>.json`) and reused; a probe not recorded yet runs as usual and is added."""
    from torch._inductor import cpu_vec_isa

    path = base / f"vec_isa-{digest_of([compiler_identity(), cpu_identity(), torch.__version__])}.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    found = {}
    probe = cpu_vec_isa.VecISA.check_build

    def check_build(isa: cpu_vec_isa.VecISA, code: str) -> bool:
        key = digest_of([type(isa).__name__, isa.build_arch_flags(), code])
        if key not in known:
            known[key] = found[key] = probe(isa, code)
        return known[key]

    cpu_vec_isa.VecISA.check_build = check_build
    try:
        cpu_vec_isa.valid_vec_isa_list()
    finally:
        cpu_vec_isa.VecISA.check_build = probe
    if found:
        try:
            base.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(path)
        except OSError:  # the cache directory is unwritable: the graph cache itself will say so
            pass


class GraphCache:
    """One entry of the graph cache. Disabled (off by option, unwritable, or after a write failed), it reads
    and writes nothing and every unit compiles as without a cache."""

    def __init__(self, root: Path, key: str, about: dict, enabled: bool) -> None:
        self.key = key
        self.dir = root / "graphs" / key
        self.about = about
        self.enabled = enabled
        self.warning: str | None = None
        self.phases: dict[str, dict] = {}
        self.units: dict[str, dict] = {}
        self.loaded = self.compiled = self.unreadable = 0
        self.absent = 0  # units asked for but never saved (a save that failed, or a concurrent start's)
        self.seconds = 0.0  # opening, checking files and writing the manifest (units' loads are the runners')
        self._dirty = False
        if enabled:
            self._open()

    @classmethod
    def open(cls, root: str | Path | None, parts: dict, about: dict, enabled: bool = True) -> "GraphCache":
        t0 = time.perf_counter()
        enabled = enabled and not switched_off()
        if _prefetch is not None:
            _prefetch.join()
        cache = cls(Path(root or default_cache_dir()).expanduser(), cache_key(parts) if enabled else "", about,
                    enabled)
        cache.seconds += time.perf_counter() - t0
        return cache

    def _open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".writable.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self.disable(f"cannot write {self.dir}: {e}")
            return
        try:
            data = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return  # a cold start (or an unreadable manifest: the same)
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("key") == self.key:
            self.phases = data.get("phases") or {}
            self.units = data.get("units") or {}

    def disable(self, reason: str) -> None:
        """Stop caching for the rest of this start, with one warning: the engine runs as without a cache."""
        if self.enabled:
            log.warning("graph cache off (%s); graphs are compiled and not saved", reason)
            self.enabled = False
            self.warning = reason

    # -- decisions --------------------------------------------------------------------------------------
    def decisions(self, phase: str) -> dict | None:
        """What the last start decided for `phase`'s buckets, as `record` was given it; None if nothing."""
        return self.phases.get(phase) if self.enabled else None

    def record(self, phase: str, decisions: dict) -> None:
        if not self.enabled:
            return
        decisions = json.loads(json.dumps(decisions))  # the form `decisions` returns, to compare with it
        if self.phases.get(phase) != decisions:
            self.phases[phase] = decisions
            self._dirty = True

    # -- units ------------------------------------------------------------------------------------------
    def unit(self, name: str) -> CacheUnit:
        return CacheUnit(self, name)

    def save(self) -> None:
        """Write the manifest if this start changed anything (atomically: a reader sees the old or the new)."""
        if not (self.enabled and self._dirty):
            return
        t0 = time.perf_counter()
        data = {"format": FORMAT, "key": self.key, "about": {**self.about, "saved": time.time()},
                "phases": self.phases, "units": self.units}
        tmp = self.dir / f"{MANIFEST}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.dir / MANIFEST)
            self._dirty = False
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.disable(f"cannot write {self.dir / MANIFEST}: {e}")
        self.seconds += time.perf_counter() - t0

    def stats(self) -> dict:
        return {"enabled": self.enabled, "dir": str(self.dir) if self.enabled else None, "key": self.key or None,
                "units_loaded": self.loaded, "units_compiled": self.compiled, "units_unreadable": self.unreadable,
                "units_absent": self.absent, "seconds": round(self.seconds, 3), "warning": self.warning}


class CacheUnit:
    """One compile's code in the cache. A backend loads it (`load`), or compiles it (`compiling`) and then
    saves it (`save`); with the cache disabled these do nothing and `load` finds nothing."""

    def __init__(self, cache: GraphCache, name: str) -> None:
        self.cache = cache
        self.name = name
        self.dir = cache.dir / "units" / name
        self._staging: Path | None = None

    def load(self, loader: Callable[[Path], T]) -> T | None:
        """`loader(unit dir)` run with Inductor reading this unit's libraries; None (counted) if the unit was
        never saved, or if it is unreadable (a file changed or missing, or the loader raised): then with a
        warning, the unit removed and counted, so the caller compiles it afresh."""
        cache = self.cache
        if not cache.enabled:
            return None
        entry = cache.units.get(self.name)
        if entry is None:
            cache.absent += 1
            return None
        t0 = time.perf_counter()
        problem = self._changed_file(entry.get("files") or {})
        cache.seconds += time.perf_counter() - t0
        if problem is None:
            try:
                with _inductor_dir(self.dir / "inductor"):
                    result = loader(self.dir)
            except Exception as e:  # whatever a damaged artifact makes torch raise
                problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            else:
                cache.loaded += 1
                return result
        log.warning("cached graph %s is unreadable (%s); compiling it again", self.name, problem)
        cache.unreadable += 1
        self.discard()
        return None

    def _changed_file(self, files: dict[str, list]) -> str | None:
        for rel, (size, digest) in files.items():
            path = self.dir / rel
            try:
                if path.stat().st_size != size or _file_digest(path) != digest:
                    return f"{rel} changed"
            except OSError:
                return f"{rel} missing"
        return None if files else "no files recorded"

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Compile inside this block: Inductor writes the libraries into a fresh staging directory, which
        `save` moves into place (so a concurrent start never sees half a unit)."""
        staging = self.dir.with_name(f"{self.name}.{os.getpid()}.tmp")
        if self.cache.enabled:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                (staging / "inductor").mkdir(parents=True)
            except OSError as e:
                self.cache.disable(f"cannot write {staging}: {e}")
        if not self.cache.enabled:
            yield
            return
        self._staging = staging
        with _inductor_dir(staging / "inductor"):
            yield

    def save(self, writer: Callable[[Path], None]) -> None:
        """`writer(dir)` writes the compiled code into the unit compiled in `compiling()`; the unit's files are
        then recorded with their checksums. A code that cannot be serialised stays unsaved (a warning; it is
        compiled again at the next start); a write that fails turns the cache off."""
        cache, staging = self.cache, self._staging
        self._staging = None
        if not cache.enabled or staging is None:
            return
        t0 = time.perf_counter()
        try:
            writer(staging)
            files = {str(p.relative_to(staging)): [p.stat().st_size, _file_digest(p)]
                     for p in sorted(staging.rglob("*")) if p.is_file() and "locks" not in p.parts}
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(self.dir)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            cache.disable(f"cannot write {self.dir}: {e}")
            return
        except Exception as e:  # not serialisable: this unit is compiled at every start, the others are cached
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("graph %s cannot be cached (%s: %s)", self.name, type(e).__name__, e)
            return
        finally:
            cache.seconds += time.perf_counter() - t0
        cache.units[self.name] = {"files": files}
        cache.compiled += 1
        cache._dirty = True

    def discard(self) -> None:
        """Forget this unit (its code failed to load or failed its check): the next capture compiles it."""
        if self.cache.units.pop(self.name, None) is not None:
            self.cache._dirty = True
        shutil.rmtree(self.dir, ignore_errors=True)


# -- `graphcap cache ls / rm` ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    bytes: int
    about: dict  # empty for an entry without a readable manifest (an interrupted or failed cold start)
    graphs: dict[str, int]  # buckets served by graphs, per phase


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_entries(root: str | Path | None = None) -> list[CacheEntry]:
    """Every entry under the cache directory, newest first."""
    base = Path(root or default_cache_dir()).expanduser() / "graphs"
    entries = []
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        if not path.is_dir():
            continue
        try:
            data = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            data = {}
        phases = data.get("phases") or {}
        graphs = {phase: sum(b.get("status") == "graph" for b in (d.get("buckets") or {}).values())
                  for phase, d in phases.items()}
        entries.append(CacheEntry(path.name, path, _size(path), data.get("about") or {}, graphs))
    return sorted(entries, key=lambda e: -e.about.get("saved", 0))


def remove_entries(keys: list[str], root: str | Path | None = None) -> list[CacheEntry]:
    """Remove the entries whose keys start with any of `keys` (all of them for an empty list)."""
    removed = [e for e in list_entries(root) if not keys or any(e.key.startswith(k) for k in keys)]
    for entry in removed:
        shutil.rmtree(entry.path, ignore_errors=True)
    return removed
