"""The parts of an HF `config.json` our decoder models use, normalised across transformers versions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphcap.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v
    qk_norm: bool
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    o_proj_bias: bool = False  # Llama/Qwen3 `attention_bias` also covers o_proj; Qwen2 never has one
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or []
        if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
            raise UserError("config.json has no 'architectures' list; cannot tell which model to build")
        arch = archs[0]
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            rope_params = dict(hf.get("rope_parameters") or {})
            scaling = hf.get("rope_scaling") or None
            if scaling is None and rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
            if scaling is not None and not isinstance(scaling, dict):
                raise TypeError(f"rope scaling must be an object, got {scaling!r}")
            theta = float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
            eos = hf.get("eos_token_id")
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            # Qwen2 hard-codes q/k/v biases (and no o_proj bias) whatever its config says.
            is_qwen2 = arch == "Qwen2ForCausalLM"
            attention_bias = bool(hf.get("attention_bias", False))
            cfg = cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                intermediate_size=int(hf["intermediate_size"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=is_qwen2 or attention_bias,
                qk_norm=arch == "Qwen3ForCausalLM",
                eos_token_ids=eos_ids,
                o_proj_bias=attention_bias and not is_qwen2,
                mlp_bias=bool(hf.get("mlp_bias", False)),
            )
        except KeyError as e:
            raise UserError(f"config.json is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"config.json has a malformed value: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Refuse configs that would otherwise fail deep inside model construction with a traceback."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise UserError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"config.json: num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"config.json: head_dim {self.head_dim} must be even for rotary embeddings")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UserError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
        if rope_type == "llama3":
            missing = [k for k in ("factor", "original_max_position_embeddings") if k not in self.rope_scaling]
            if missing:
                raise UserError(f"config.json: llama3 rope scaling lacks {', '.join(missing)}")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"unsupported dtype {name!r} (choose from {', '.join(sorted(table))})")
    return table[name]
