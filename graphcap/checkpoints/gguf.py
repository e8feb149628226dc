"""GGUF checkpoints (llama.cpp's single-file format): hyper-parameters, tensors and tokenizer metadata.

The `gguf` package reads the file and dequantises every block type it knows, so values equal what HF
transformers and llama.cpp see. Tensors are renamed to HF's names and llama.cpp's rotary row permutation
of Llama's q/k projections is undone, so the models load a GGUF exactly as an HF directory. Each quantised
tensor's own blocks stay available (`GGUFCheckpoint.blocks`), rows in the same order as the dequantised
weight, for layers that compute on them directly.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from graphcap.checkpoints.gguf_header import read_header
from graphcap.errors import UserError

# GGUF architecture -> HF architecture name our model registry knows.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class QuantizedBlocks:
    """A tensor's GGUF blocks as stored: `data` is [rows, bytes per row] uint8, `shape` the logical
    [rows, columns] of the weight they encode, `ggml_type` the block format's name (Q4_1, Q8_0, ...)."""

    ggml_type: str
    data: torch.Tensor
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these blocks encode, as the `gguf` package (and so HF and llama.cpp) reads it."""
        from gguf import GGMLQuantizationType, quants

        values = quants.dequantize(self.data.numpy(), GGMLQuantizationType[self.ggml_type])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape)


def is_gguf_path(model: str) -> bool:
    return model.lower().endswith(".gguf")


class GGUFCheckpoint:
    """One GGUF file, validated up front so a bad file fails before any model is built."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise UserError(f"GGUF file {str(self.path)!r} does not exist")
        try:
            self.metadata, self._tensors = read_header(self.path)
        except (ValueError, IndexError, OSError, TypeError, KeyError, UnicodeDecodeError, MemoryError) as e:
            raise UserError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
        self.arch = self._architecture()
        self.hf_config = self._hf_config()
        self._check_tensors()

    # -- configuration ----------------------------------------------------------------------------------
    def _architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise UserError(f"{self.path} has no general.architecture; cannot tell which model it holds")
        if arch not in ARCHITECTURES:
            raise UserError(
                f"{self.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        return arch

    def _get(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self.metadata.get(f"{self.arch}.{key}", default)
        if required and value is None:
            raise UserError(f"{self.path} lacks the metadata key {self.arch}.{key}")
        return value

    def _hf_config(self) -> dict:
        """An HF-style config.json built from the metadata, so one `ModelConfig.from_hf` serves both formats."""
        heads = int(self._get("attention.head_count", required=True))
        hidden = int(self._get("embedding_length", required=True))
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab = self._get("vocab_size") or (len(tokens) if tokens is not None else None)
        if vocab is None:
            vocab = self._tensor_shape("token_embd.weight")[0]
        if any(t.name.startswith("rope_freqs") for t in self._tensors):
            raise UserError(f"{self.path}: rotary frequency tensors (llama3 rope scaling in GGUF) are not supported")
        if self._get("rope.scaling.type") not in (None, "none"):
            raise UserError(f"{self.path}: rope scaling {self._get('rope.scaling.type')!r} is not supported")
        eos = self.metadata.get("tokenizer.ggml.eos_token_id")
        cfg = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "num_hidden_layers": int(self._get("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._get("attention.head_count_kv") or heads),
            "head_dim": int(self._get("attention.key_length") or hidden // heads),
            "intermediate_size": int(self._get("feed_forward_length", required=True)),
            "rms_norm_eps": float(self._get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._get("context_length", 2048)),
            "tie_word_embeddings": not self._has_tensor("output.weight"),
            "attention_bias": self._has_tensor("blk.0.attn_q.bias"),
            "mlp_bias": self._has_tensor("blk.0.ffn_up.bias"),
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "torch_dtype": "float32",
        }
        if self.arch == "qwen2" and not cfg["attention_bias"]:
            raise UserError(f"{self.path}: a qwen2 GGUF must carry q/k/v biases (blk.0.attn_q.bias is missing)")
        return cfg

    def _has_tensor(self, name: str) -> bool:
        return any(t.name == name for t in self._tensors)

    def _tensor_shape(self, name: str) -> tuple[int, ...]:
        for t in self._tensors:
            if t.name == name:
                return tuple(int(d) for d in reversed(t.shape))
        raise UserError(f"{self.path} has no tensor {name}")

    def _check_tensors(self) -> None:
        from gguf import GGML_QUANT_SIZES

        for t in self._tensors:
            if t.tensor_type not in GGML_QUANT_SIZES:
                raise UserError(f"{self.path}: tensor {t.name} has an unknown type {int(t.tensor_type)}")
            if self._hf_name(t.name) is None:
                raise UserError(f"{self.path}: tensor {t.name} has no place in a {self.arch} model")
        width = self._tensor_shape("token_embd.weight")
        if width[0] != self.hf_config["vocab_size"]:
            raise UserError(
                f"{self.path}: the embedding has {width[0]} rows but the vocabulary has "
                f"{self.hf_config['vocab_size']} tokens"
            )

    # -- tensors ----------------------------------------------------------------------------------------
    def _hf_name(self, name: str) -> str | None:
        stem, _, kind = name.rpartition(".")
        if stem in _GLOBAL_TENSORS and kind == "weight":
            return f"{_GLOBAL_TENSORS[stem]}.weight"
        m = _LAYER_NAME.match(name)
        if m and m.group(2) in _LAYER_TENSORS:
            return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
        return None

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        """llama.cpp's converter interleaves the two rotary halves of each Llama q/k head (it computes
        rotary on adjacent pairs); HF and our models rotate halves, so rows go back to HF's order."""
        if self.arch != "llama":
            return None
        m = _LAYER_NAME.match(name)
        if not m or m.group(2) not in ("attn_q", "attn_k"):
            return None
        heads = self.hf_config["num_attention_heads"] if m.group(2) == "attn_q" else self.hf_config[
            "num_key_value_heads"]
        if rows % (2 * heads):
            raise UserError(f"{self.path}: {name} has {rows} rows, not a whole number of {heads} rotary heads")
        half = rows // heads // 2
        # GGUF row h*2*half + 2*i + j holds HF row h*2*half + j*half + i.
        gguf_rows = np.arange(rows).reshape(heads, half, 2).transpose(0, 2, 1).reshape(rows)
        return gguf_rows

    def tensors(self, keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedBlocks]]:
        """HF-named float32 tensors, dequantised one at a time (a model never holds two copies of all).

        With `keep_blocks`, every quantised 2-D tensor comes as its `QuantizedBlocks` instead, undecoded, for
        layers that compute on the file's own blocks (a layer that cannot dequantises them on loading)."""
        from gguf import quants

        for t in self._tensors:
            if keep_blocks and self._is_quantized_matrix(t):
                yield self._hf_name(t.name), self._blocks_of(t)
                continue
            try:
                values = quants.dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise UserError(f"{self.path}: cannot dequantise {t.name} ({t.tensor_type.name}): {e}") from None
            values = np.ascontiguousarray(values, dtype=np.float32)
            tensor = torch.from_numpy(values if values.flags.writeable else values.copy())
            order = self._row_order(t.name, tensor.shape[0])
            if order is not None:
                tensor = tensor[torch.from_numpy(order)]
            yield self._hf_name(t.name), tensor

    def has_quantized_tensors(self) -> bool:
        return any(self._is_quantized_matrix(t) for t in self._tensors)

    def blocks(self) -> dict[str, QuantizedBlocks]:
        """Every quantised 2-D tensor's blocks by HF name (rows in HF order), memory-mapped, not copied
        beyond the row reorder of q/k."""
        return {self._hf_name(t.name): self._blocks_of(t) for t in self._tensors if self._is_quantized_matrix(t)}

    @staticmethod
    def _is_quantized_matrix(tensor) -> bool:
        from gguf import GGMLQuantizationType

        plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
        return tensor.tensor_type not in plain and len(tensor.shape) == 2

    def _blocks_of(self, tensor) -> QuantizedBlocks:
        with warnings.catch_warnings():  # the blocks are a read-only file mapping and are never written
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.asarray(tensor.data))
        order = self._row_order(tensor.name, data.shape[0])
        if order is not None:
            data = data[torch.from_numpy(order)]
        return QuantizedBlocks(tensor.tensor_type.name, data, tuple(int(d) for d in reversed(tensor.shape)))

    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None

    def special_token(self, which: str) -> str | None:
        """The text of the bos/eos token, which chat templates print."""
        idx = self.metadata.get(f"tokenizer.ggml.{which}_token_id")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if idx is None or tokens is None or not 0 <= int(idx) < len(tokens):
            return None
        return tokens[int(idx)]
