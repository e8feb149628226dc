"""Which of our encoder classes serves a checkpoint's `architectures` entry.

Kept apart from the decoder registry because encoders have no KV cache or logits and are loaded and run
by a different path; heads (`BertForMaskedLM`, `ViTForImageClassification`, ...) map to the bare encoder
because graphcap serves embeddings, and the loader skips the head weights.
"""

from __future__ import annotations

from torch import nn

from graphcap.errors import UserError
from graphcap.models.bert import BertModel
from graphcap.models.vit import ViTModel

ENCODER_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "BertModel": BertModel,
    "BertForMaskedLM": BertModel,
    "BertForPreTraining": BertModel,
    "ViTModel": ViTModel,
    "ViTForImageClassification": ViTModel,
}

# Fallback for configs without `architectures` (some sentence-transformers exports omit it).
_MODEL_TYPES: dict[str, str] = {"bert": "BertModel", "vit": "ViTModel"}


def encoder_architecture(hf_config: dict) -> str:
    """The architecture name of an HF config: `architectures[0]`, else derived from `model_type`."""
    archs = hf_config.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = hf_config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise UserError(
        "config.json has neither 'architectures' nor a known 'model_type'; cannot tell which encoder to build"
    )


def resolve_encoder(architecture: str) -> type[nn.Module]:
    cls = ENCODER_ARCHITECTURES.get(architecture)
    if cls is None:
        raise UserError(
            f"unsupported encoder architecture {architecture!r}; supported: {', '.join(sorted(ENCODER_ARCHITECTURES))}"
        )
    return cls
