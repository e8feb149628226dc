"""Engine configuration: one dataclass reachable from `LLM(...)`, the CLI and a JSON file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from graphcap.errors import UserError
from graphcap.graph.config import DEFAULT_DECODE_SIZES, DecodeGraphConfig

GRAPH_PREFILL_MODES = ("eager",)


@dataclass
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    tp_size: int = 1
    graph_decode: str = "eager"
    graph_prefill: str = "eager"
    kv_cache_tokens: int | None = None  # None: derived from kv_cache_memory_fraction, or a default
    kv_cache_memory_fraction: float | None = None
    page_size: int = 16
    max_running_requests: int = 64
    max_prefill_tokens: int = 2048  # prefill token budget per step; longer prompts are chunked
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    decode_sizes: list[int] | tuple[int, ...] = DEFAULT_DECODE_SIZES
    max_decode_batch_size: int | None = None
    graph_select: str = "auto"
    graph_verify: str = "warn"
    decode_attention: str = "auto"
    inductor_options: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def decode_graph(self) -> DecodeGraphConfig:
        if not isinstance(self.decode_sizes, (list, tuple)):
            raise UserError(f"decode_sizes must be a list of integers, got {self.decode_sizes!r}")
        if not isinstance(self.inductor_options, dict):
            raise UserError(f"inductor_options must be a mapping, got {self.inductor_options!r}")
        return DecodeGraphConfig(
            mode=self.graph_decode,
            sizes=tuple(self.decode_sizes),
            max_batch_size=self.max_decode_batch_size,
            select=self.graph_select,
            verify=self.graph_verify,
            attention=self.decode_attention,
            inductor_options=tuple(sorted(self.inductor_options.items())),
        )

    def validate(self) -> None:
        self.decode_graph().validate()
        if self.graph_prefill not in GRAPH_PREFILL_MODES:
            raise UserError(
                f"graph_prefill={self.graph_prefill!r} is not supported; choose from {GRAPH_PREFILL_MODES}"
            )
        for name in ("page_size", "max_running_requests", "max_prefill_tokens", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_cache_tokens is not None and (not isinstance(self.kv_cache_tokens, int) or self.kv_cache_tokens < 1):
            raise UserError(f"kv_cache_tokens must be a positive integer, got {self.kv_cache_tokens!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise UserError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        frac = self.kv_cache_memory_fraction
        if frac is not None and not (0 < frac < 1):
            raise UserError(f"kv_cache_memory_fraction must be in (0, 1), got {frac!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.extra:
            raise UserError(f"unknown engine option(s): {', '.join(sorted(self.extra))}")


def config_from_kwargs(model: str, kwargs: dict) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)} - {"model", "extra"}
    known = {k: v for k, v in kwargs.items() if k in names}
    extra = {k: v for k, v in kwargs.items() if k not in names}
    cfg = EngineConfig(model=model, **known, extra=extra)
    cfg.validate()
    return cfg


def load_json_config(path: str | Path) -> dict:
    """Read a JSON options file (`--graph-config`), refusing anything but an object."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a JSON object")
    return data
