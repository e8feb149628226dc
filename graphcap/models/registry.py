"""Which of our model classes serves a checkpoint's `architectures` entry."""

from __future__ import annotations

from torch import nn

from graphcap.errors import UserError
from graphcap.models.llama import LlamaForCausalLM

DECODER_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def resolve_decoder(architecture: str) -> type[nn.Module]:
    cls = DECODER_ARCHITECTURES.get(architecture)
    if cls is None:
        raise UserError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(DECODER_ARCHITECTURES))}"
        )
    return cls
