"""Per-phase graph configuration, reachable from `LLM(...)`, the CLI and `--graph-config` JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from graphcap.errors import UserError

DECODE_MODES = ("eager", "full")
SELECT_MODES = ("auto", "always")
VERIFY_MODES = ("warn", "strict", "off")
DEFAULT_DECODE_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class DecodeGraphConfig:
    mode: str = "eager"
    sizes: tuple[int, ...] = DEFAULT_DECODE_SIZES
    max_batch_size: int | None = None  # clamped to max_running_requests
    select: str = "auto"  # auto: keep a bucket's graph only where it beats eager at capture
    verify: str = "warn"  # warn: drop a bucket whose replay differs from eager; strict: raise
    atol: float = 1e-4  # logits tolerance (fp32); relative part below
    rtol: float = 1e-4
    attention: str = "auto"  # inline | opaque | auto (inline on CPU, opaque on CUDA)
    inductor_options: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.mode not in DECODE_MODES:
            raise UserError(f"graph_decode={self.mode!r} is not supported; choose from {DECODE_MODES}")
        if self.select not in SELECT_MODES:
            raise UserError(f"graph_select={self.select!r} is not supported; choose from {SELECT_MODES}")
        if self.verify not in VERIFY_MODES:
            raise UserError(f"graph_verify={self.verify!r} is not supported; choose from {VERIFY_MODES}")
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise UserError(f"decode_sizes must be positive integers, got {list(self.sizes)!r}")
        if self.attention not in ("auto", "inline", "opaque"):
            raise UserError(f"decode attention must be auto, inline or opaque, got {self.attention!r}")

    def buckets(self, max_running_requests: int) -> list[int]:
        cap = min(self.max_batch_size or max_running_requests, max_running_requests)
        return sorted({s for s in self.sizes if s <= cap})
