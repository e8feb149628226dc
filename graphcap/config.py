"""Engine configuration: one dataclass reachable from `LLM(...)`, the CLI and a JSON file."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from graphcap.compilation.config import CompilationConfig
from graphcap.common.json_file import read_json_object
from graphcap.errors import UserError
from graphcap.graph.config import (
    DEFAULT_DECODE_MODE,
    DEFAULT_DECODE_SIZES,
    DEFAULT_PREFILL_MODE,
    DEFAULT_PREFILL_SIZES,
    DecodeGraphConfig,
    PrefillGraphConfig,
)
from graphcap.graph.config import DEFAULT_ENCODER_BATCH_SIZES, DEFAULT_ENCODER_SEQ_LENS, EncoderGraphConfig



def option(default=dataclasses.MISSING, help: str = "", flag: str | None = None, **kw):
    """An engine option: its default, the help text its generated CLI flag shows, and the flag's name when
    it is not `--field-name` (`--tp`, `--no-cache`)."""
    return field(default=default, metadata={"help": help, "flag": flag}, **kw)


@dataclass
class EngineConfig:
    """Every engine option, reachable from `LLM(...)`, `--graph-config` JSON and a CLI flag generated from the
    field (graphcap.cli.add_engine_args)."""

    model: str
    device: str = option("cpu", "cpu (default) or cuda")
    dtype: str = option("float32", "float32 (default), bfloat16 or float16")
    tp_size: int = option(1, "tensor-parallel ranks", flag="--tp")
    threads: int | None = option(None, "intra-op threads of eager ops, compiled code and graphcap's kernels "
                                       "(default: every core this process may use, shared by the TP ranks)")
    # None: the default for a decoder, graphs (decode "full", prefill "breakable", as SGLang and vLLM default
    # to graphs); encoders take graph_encoder instead. "eager" turns a phase's graphs off.
    graph_decode: str | None = option(None, "full (default), piecewise or eager")
    graph_prefill: str | None = option(None, "breakable (default), piecewise or eager")
    kv_cache_tokens: int | None = option(None, "KV cache capacity in tokens (default: from "
                                               "--kv-cache-memory-fraction, else 32768)")
    kv_cache_memory_fraction: float | None = option(None, "KV cache size as a fraction of free memory")
    page_size: int = option(16, "tokens per KV cache page")
    max_running_requests: int = option(64, "requests decoded together at most")
    max_prefill_tokens: int = option(2048, "prefill token budget per step; longer prompts are chunked")
    max_model_len: int | None = option(None, "longest request in tokens (default: the model's positions)")
    prefill_sizes: list[int] | tuple[int, ...] = option(DEFAULT_PREFILL_SIZES, "prefill token-count buckets")
    max_prefill_padding: float = option(2.0, "pad a prefill to its bucket only while bucket <= ratio * tokens")
    decode_sizes: list[int] | tuple[int, ...] = option(DEFAULT_DECODE_SIZES, "decode batch-size buckets")
    max_decode_batch_size: int | None = option(None, "largest decode bucket (default: max_running_requests)")
    graph_select: str = option("auto", "auto: keep a bucket's graph only where it beats eager at capture; always")
    graph_verify: str = option("warn", "warn: drop a bucket less accurate than eager; strict: raise; off")
    decode_attention: str = option("auto", "attention in decode graphs: inline, opaque or auto")
    cpu_kernels: bool = option(True, "use torch ops instead of graphcap's C++ CPU attention kernels",
                               flag="--no-cpu-kernels")
    inductor_options: dict = option(help="Inductor config for CPU graphs as JSON or a JSON file, e.g. "
                                         "'{\"freezing\": true}'", default_factory=dict)
    # encoder checkpoints (BERT, ViT): `LLM.embed`; graphs per (batch, sequence length) bucket
    graph_encoder: str = option("eager", "encoder graphs: eager (default) or full")
    encoder_sizes: list[int] | tuple[int, ...] = option(DEFAULT_ENCODER_BATCH_SIZES, "encoder batch buckets")
    encoder_seq_lens: list[int] | tuple[int, ...] = option(DEFAULT_ENCODER_SEQ_LENS, "encoder sequence buckets")
    encoder_parallel: str = option("tp", "tp: encoder sharded over the TP group; dp: whole encoder per rank")
    # compilation (graph_decode="piecewise"): quantization, compiler config and its artifact cache
    quantization: str | None = option(
        None, "weights: a quantised GGUF keeps its own blocks on CPU by default (gguf), other checkpoints load "
        "unquantised (none); int8 / int4 quantise a float checkpoint at load; fp8, fp8-static")
    compilation_config: dict | CompilationConfig | None = option(
        None, "compilation options (backend, custom_ops, pass_config, ...) as JSON or a JSON file")
    cache_dir: str | None = option(None, "compiled-artifact cache (default: the user cache dir)")
    use_cache: bool = option(True, "neither read nor write compiled artifacts", flag="--no-cache")
    graph_cache: bool = option(True, "neither restore nor save captured graphs and their capture decisions "
                                     "(also GRAPHCAP_GRAPH_CACHE=0)", flag="--no-graph-cache")
    extra: dict = field(default_factory=dict)

    def prefill_graph(self) -> PrefillGraphConfig:
        if not isinstance(self.prefill_sizes, (list, tuple)):
            raise UserError(f"prefill_sizes must be a list of integers, got {self.prefill_sizes!r}")
        return PrefillGraphConfig(
            mode=self.graph_prefill or DEFAULT_PREFILL_MODE,
            sizes=tuple(self.prefill_sizes),
            max_padding_ratio=self.max_prefill_padding,
            select=self.graph_select,
            verify=self.graph_verify,
            inductor_options=tuple(sorted(self.inductor_options.items())),
        )

    def decode_graph(self) -> DecodeGraphConfig:
        if not isinstance(self.decode_sizes, (list, tuple)):
            raise UserError(f"decode_sizes must be a list of integers, got {self.decode_sizes!r}")
        if not isinstance(self.inductor_options, dict):
            raise UserError(f"inductor_options must be a mapping, got {self.inductor_options!r}")
        return DecodeGraphConfig(
            mode=self.graph_decode or DEFAULT_DECODE_MODE,
            sizes=tuple(self.decode_sizes),
            max_batch_size=self.max_decode_batch_size,
            select=self.graph_select,
            verify=self.graph_verify,
            attention=self.decode_attention,
            inductor_options=tuple(sorted(self.inductor_options.items())),
        )

    def encoder_graph(self) -> EncoderGraphConfig:
        for name in ("encoder_sizes", "encoder_seq_lens"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise UserError(f"{name} must be a list of integers, got {getattr(self, name)!r}")
        if not isinstance(self.inductor_options, dict):
            raise UserError(f"inductor_options must be a mapping, got {self.inductor_options!r}")
        return EncoderGraphConfig(
            mode=self.graph_encoder,
            batch_sizes=tuple(self.encoder_sizes),
            seq_lens=tuple(self.encoder_seq_lens),
            parallel=self.encoder_parallel,
            select=self.graph_select,
            verify=self.graph_verify,
            inductor_options=tuple(sorted(self.inductor_options.items())),
        )

    def compilation(self) -> CompilationConfig:
        """The compilation config, with the top-level cache options applied over it."""
        cc = self.compilation_config
        if cc is None:
            cc = CompilationConfig()
        elif isinstance(cc, dict):
            cc = CompilationConfig.from_dict(cc)
        elif not isinstance(cc, CompilationConfig):
            raise UserError(f"compilation_config must be a mapping or CompilationConfig, got {cc!r}")
        if self.cache_dir is not None:
            cc = dataclasses.replace(cc, cache_dir=self.cache_dir)
        if not isinstance(self.use_cache, bool):
            raise UserError(f"use_cache must be true or false, got {self.use_cache!r}")
        return cc if self.use_cache else dataclasses.replace(cc, use_cache=False)

    def intra_op_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // self.tp_size)

    def validate(self) -> None:
        _check_inductor_options(self.inductor_options)
        self.decode_graph().validate()
        self.compilation()
        from graphcap.layers.quantization import quant_method_factory

        quant_method_factory(self.quantization)  # raises on an unknown name
        self.encoder_graph().validate()
        self.prefill_graph().validate()
        for name in ("page_size", "max_running_requests", "max_prefill_tokens", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise UserError(f"threads must be a positive integer, got {self.threads!r}")
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
    return read_json_object(Path(path))


def _check_inductor_options(options: object) -> None:
    """Unknown Inductor keys would only fail at capture (and fall back to eager); refuse them up front."""
    if not isinstance(options, dict):
        raise UserError(f"inductor_options must be a mapping, got {options!r}")
    import torch._inductor.config as inductor_config

    for key in options:
        node: object = inductor_config
        for part in str(key).split("."):
            if not hasattr(node, part):
                raise UserError(f"unknown Inductor option {key!r} in inductor_options")
            node = getattr(node, part)
