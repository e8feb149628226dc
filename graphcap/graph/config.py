"""Per-phase graph configuration, reachable from `LLM(...)`, the CLI and `--graph-config` JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from graphcap.errors import UserError

DECODE_MODES = ("eager", "full", "piecewise")
DEFAULT_DECODE_MODE = "full"
SELECT_MODES = ("auto", "always")
VERIFY_MODES = ("warn", "strict", "off")
# On CPU every bucket above 1 shares one compile (a dynamic batch dimension), so a bucket costs only its
# capture-time verification and timing, and five buckets keep padding below 2x for every batch up to 16.
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
    attention: str = "auto"  # inline | opaque | auto (opaque for piecewise or on CUDA, else inline)
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


ENCODER_MODES = ("eager", "full")
ENCODER_PARALLEL_MODES = ("tp", "dp")
DEFAULT_ENCODER_BATCH_SIZES = (1, 8, 32)
DEFAULT_ENCODER_SEQ_LENS = (16, 32, 64, 128)


@dataclass(frozen=True)
class EncoderGraphConfig:
    """Encoder graphs: one per (batch, sequence length) bucket; images use their fixed token count."""

    mode: str = "eager"
    batch_sizes: tuple[int, ...] = DEFAULT_ENCODER_BATCH_SIZES
    seq_lens: tuple[int, ...] = DEFAULT_ENCODER_SEQ_LENS
    parallel: str = "tp"  # tp: weights sharded, capture enters the TP group's capture; dp: whole model per rank
    select: str = "auto"
    verify: str = "warn"
    atol: float = 1e-4  # on the pooled embedding (unit-norm for text models)
    rtol: float = 1e-4
    inductor_options: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.mode not in ENCODER_MODES:
            raise UserError(f"graph_encoder={self.mode!r} is not supported; choose from {ENCODER_MODES}")
        if self.parallel not in ENCODER_PARALLEL_MODES:
            raise UserError(f"encoder_parallel={self.parallel!r} is not supported; choose from {ENCODER_PARALLEL_MODES}")
        if self.select not in SELECT_MODES:
            raise UserError(f"graph_select={self.select!r} is not supported; choose from {SELECT_MODES}")
        if self.verify not in VERIFY_MODES:
            raise UserError(f"graph_verify={self.verify!r} is not supported; choose from {VERIFY_MODES}")
        for name, values in (("encoder_sizes", self.batch_sizes), ("encoder_seq_lens", self.seq_lens)):
            if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in values):
                raise UserError(f"{name} must be positive integers, got {list(values)!r}")


PREFILL_MODES = ("eager", "breakable", "piecewise")
DEFAULT_PREFILL_MODE = "breakable"
DEFAULT_PREFILL_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class PrefillGraphConfig:
    """Prefill graphs capture only the transformer body, keyed by the number of tokens in the batch."""

    mode: str = "eager"
    sizes: tuple[int, ...] = DEFAULT_PREFILL_SIZES  # token-count buckets, clipped to the prefill budget
    max_padding_ratio: float = 2.0  # pad to a bucket only while padded tokens <= ratio * real tokens
    select: str = "auto"
    verify: str = "warn"
    atol: float = 1e-4
    rtol: float = 1e-4
    inductor_options: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.mode not in PREFILL_MODES:
            raise UserError(f"graph_prefill={self.mode!r} is not supported; choose from {PREFILL_MODES}")
        if self.select not in SELECT_MODES:
            raise UserError(f"graph_select={self.select!r} is not supported; choose from {SELECT_MODES}")
        if self.verify not in VERIFY_MODES:
            raise UserError(f"graph_verify={self.verify!r} is not supported; choose from {VERIFY_MODES}")
        if not self.sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.sizes):
            raise UserError(f"prefill_sizes must be positive integers, got {list(self.sizes)!r}")
        if not isinstance(self.max_padding_ratio, (int, float)) or self.max_padding_ratio < 1:
            raise UserError(f"max_prefill_padding must be >= 1, got {self.max_padding_ratio!r}")

    def buckets(self, max_prefill_tokens: int) -> list[int]:
        """The configured sizes up to the prefill budget, plus the budget itself so every chunk fits one."""
        return sorted({s for s in self.sizes if s < max_prefill_tokens} | {max_prefill_tokens})
