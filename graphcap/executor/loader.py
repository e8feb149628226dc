"""Turn a checkpoint directory or a preset name into a loaded model. Safetensors only: never unpickle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from graphcap.common.json_file import read_json_object
from graphcap.checkpoints.gguf import GGUFCheckpoint, QuantizedBlocks, is_gguf_path
from graphcap.checkpoints.smollm2 import smollm2_gguf_path
from graphcap.checkpoints.tokenizer_source import TokenizerSource, hf_tokenizer_source
from graphcap.errors import UserError
from graphcap.executor.presets import PRESETS, preset_config, preset_weights
from graphcap.models.config import ModelConfig
from graphcap.models.registry import resolve_decoder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Presets of real pretrained checkpoints: name -> where the file is (installed with a package).
REAL_PRESETS: dict[str, Callable[[], Path]] = {"smollm2": smollm2_gguf_path}


@dataclass
class ModelSource:
    """Where a model comes from: its parsed config, HF config dict, weights and optional tokenizer."""

    name: str
    hf_config: dict
    config: ModelConfig
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: TokenizerSource | None
    # A quantised GGUF's tensors with its quantised matrices left as their blocks; None for other sources.
    block_weights: Callable[[], Iterator[tuple[str, torch.Tensor | QuantizedBlocks]]] | None = None


def resolve_source(model: str) -> ModelSource:
    if model in PRESETS:
        hf = preset_config(model)
        return ModelSource(model, hf, ModelConfig.from_hf(hf), lambda: preset_weights(model), None)
    if model in REAL_PRESETS:
        return gguf_source(REAL_PRESETS[model]())
    if is_gguf_path(model):
        return gguf_source(Path(model))
    path = Path(model).expanduser()
    if not path.exists():
        presets = ", ".join([*PRESETS, *REAL_PRESETS])
        raise UserError(f"model {model!r} is neither a preset ({presets}), a .gguf file nor an existing directory")
    if not path.is_dir():
        raise UserError(f"model path {str(path)!r} is neither a directory (HF checkpoint) nor a .gguf file")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.json; not an HF-format checkpoint")
    hf = read_json_object(cfg_file)
    config = ModelConfig.from_hf(hf)
    files = safetensors_files(path)
    return ModelSource(str(path), hf, config, lambda: iter_safetensors(files), hf_tokenizer_source(path))


def gguf_source(path: Path) -> ModelSource:
    """A GGUF file: config from its metadata, dequantised tensors, the tokenizer its metadata describes."""
    ckpt = GGUFCheckpoint(path)
    tokenizer = None
    if "tokenizer.ggml.tokens" in ckpt.metadata:
        tokenizer = TokenizerSource(lambda: _gguf_tokenizer(ckpt.metadata), ckpt.chat_template(),
                                    ckpt.special_token("bos"), ckpt.special_token("eos"), str(ckpt.path))
    blocks = (lambda: ckpt.tensors(keep_blocks=True)) if ckpt.has_quantized_tensors() else None
    return ModelSource(str(ckpt.path), ckpt.hf_config, ModelConfig.from_hf(ckpt.hf_config), ckpt.tensors, tokenizer,
                       blocks)


def _gguf_tokenizer(metadata: dict):
    from graphcap.checkpoints.gguf_tokenizer import build_tokenizer

    return build_tokenizer(metadata)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is malformed: {e}") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index.name} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UserError(
            f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); graphcap never unpickles files. "
            "Convert once with: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-st', safe_serialization=True)\""
        )
    raise UserError(f"{path} has no *.safetensors weights")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"cannot read {f}: {e}") from None


def build_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, quant_method_factory=lambda: None,
    keep_blocks: bool = False,
) -> nn.Module:
    """`keep_blocks`: load a quantised GGUF's matrices as their blocks (for `--quantization gguf`)."""
    cls = resolve_decoder(source.config.architecture)
    with torch.device(device):
        model = cls(source.config, dtype, quant_method_factory)
    weights = source.block_weights if keep_blocks and source.block_weights is not None else source.weights
    return load_checked(model, weights())


def load_checked(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> nn.Module:
    """Load HF-named weights into one of our models, refuse a checkpoint that does not fill every required
    parameter, then let quantisation methods post-process their layers. Shared by decoders and encoders."""
    try:
        loaded = model.load_weights(weights)
    except UserError:
        raise
    except (ValueError, RuntimeError) as e:  # a tensor of the wrong shape surfaces as either
        raise UserError(f"checkpoint does not fit the model: {e}") from None
    expected = {n for n, p in model.named_parameters() if not getattr(p, "optional_in_checkpoint", False)}
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"checkpoint is missing {len(missing)} weights: {shown}")
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
        finish = getattr(module, "finish_loading", None)  # a layer's own post-load layout change
        if finish is not None:
            finish()
    return model.eval()
