"""Our C++ CPU kernels: built on first use with the installed compiler, cached, optional.

The build (about 10 s) happens once per machine, torch version and kernel source; the result is cached
under graphcap's cache directory and loaded in well under a second afterwards. The kernels are a speed-up,
never a requirement: when the build fails (no compiler, no ninja) callers keep their torch formulation and
`status()` says why.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sys
import threading
from pathlib import Path

import torch

from graphcap.common.digest import default_cache_dir

log = logging.getLogger("graphcap")

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "paged_decode_attention.cpp", CSRC / "paged_prefill_attention.cpp", CSRC / "gguf_linear.cpp"]
HEADERS = [CSRC / "kernel_common.h"]
# -fopenmp: at::parallel_for is OpenMP in torch's CPU build, and without the flag its pragmas compile to one
# thread, so `--threads` would not reach the kernels.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

# The prefill kernel scores keys one at a time against a tile of queries; SDPA's blocked flash kernel
# overtakes it on long contexts. Measured on the CPU machine (8 heads over 4 kv heads of 64): 1.2x faster
# at 128 keys, even at 512, 1.6x slower at 2048.
PREFILL_MAX_KEYS = 512

_lock = threading.Lock()
_status: str | None = None  # "ready" or "unavailable: ..."


def _build_dir() -> Path:
    """One directory per (sources, flags, torch, CPU capability): -march=native code is only valid where built."""
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = "|".join([*texts, " ".join(CFLAGS), torch.__version__, platform.machine(),
                    torch.backends.cpu.get_cpu_capability()])
    path = default_cache_dir() / "kernels" / hashlib.sha256(key.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build() -> str:
    from torch.utils.cpp_extension import load

    try:
        build_dir = _build_dir()
        if not (build_dir / "graphcap_cpu_kernels.so").exists():  # a pause of seconds deserves a word
            print("graphcap: building the C++ CPU kernels (once per machine, about 10 s)", file=sys.stderr)
        load(name="graphcap_cpu_kernels", sources=[str(source) for source in SOURCES], extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, no source, read-only cache: torch ops serve instead
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        log.warning("graphcap CPU kernels unavailable (%s); using torch ops instead", reason)
        return f"unavailable: {reason}"

    @torch.library.register_fake("graphcap_cpu::paged_decode_attention")
    def _fake(q, k_cache, v_cache, kv_indices, q_pos, scale):
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    @torch.library.register_fake("graphcap_cpu::paged_prefill_attention")
    def _prefill_fake(q, k, v, k_cache, v_cache, slot_mapping, kv_indices, q_pos, out_index, scale):
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

    @torch.library.register_fake("graphcap_cpu::gguf_linear")
    def _gguf_linear_fake(x, blocks, qtype, gemm_min_rows):
        return x.new_empty(x.shape[0], blocks.shape[0])

    return "ready"


def status() -> str:
    """Build (once per process) and report: "ready", or "unavailable: <reason>"."""
    global _status
    with _lock:
        if _status is None:
            _status = _build()
        return _status


def available() -> bool:
    return status() == "ready"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indices: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over the paged cache, same contract as `torch_native.decode_attention`
    (q: [B, H, D]; kv_indices: [B, L]; q_pos: [B, 1] -> [B, H*D]); call only when `available()`."""
    return torch.ops.graphcap_cpu.paged_decode_attention(q, k_cache, v_cache, kv_indices, q_pos, scale)


def prefill_kernel_fits(block_table: torch.Tensor, page_size: int) -> bool:
    """Whether the prefill kernel serves a batch whose requests' keys span these pages (else SDPA does)."""
    return block_table.shape[1] * page_size <= PREFILL_MAX_KEYS


def paged_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_indices: torch.Tensor,
    q_pos: torch.Tensor,
    out_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store the new keys/values, then causal attention of every new token over its request's keys: what
    `torch_native.write_and_attend` does, for any mix of prefixes and lengths; call only when `available()`.

    q: [T, H, D]; k/v: [T, Hkv, D]; kv_indices: [B, L] cache slot of each key position; q_pos: [B, Lq];
    out_index: [T] flat [B*Lq] slot of each token (its request and position) -> [T, H*D].
    """
    return torch.ops.graphcap_cpu.paged_prefill_attention(q, k, v, k_cache, v_cache, slot_mapping, kv_indices,
                                                          q_pos, out_index, scale)
