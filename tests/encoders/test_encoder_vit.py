"""graphcap's ViT against HF `ViTModel` on a tiny random checkpoint saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graphcap.executor.encoder_loader import load_encoder
from graphcap.executor.loader import iter_safetensors, safetensors_files
from graphcap.models.vit import ViTConfig, ViTModel, rename_vit_weight

from .helpers import run_tp2, save_hf, tiny_vit_config

transformers = pytest.importorskip("transformers")
RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def hf_vit():
    torch.manual_seed(0)
    return transformers.ViTModel(tiny_vit_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, hf_vit) -> Path:
    return save_hf(hf_vit, tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_forward_matches_hf(checkpoint: Path, hf_vit, pixels: torch.Tensor) -> None:
    encoder = load_encoder(str(checkpoint))
    assert isinstance(encoder.model, ViTModel) and encoder.tokenizer is None
    with torch.inference_mode():
        ours = encoder.model(pixels)
        ref = hf_vit(pixel_values=pixels).last_hidden_state
    assert ours.shape == (3, 1 + 16, 64)
    assert rel_err(ours, ref) < RTOL
    assert torch.allclose(ours, ref, rtol=RTOL, atol=RTOL)


def test_embed_is_the_cls_token(checkpoint: Path, hf_vit, pixels: torch.Tensor) -> None:
    model = load_encoder(str(checkpoint)).model
    with torch.inference_mode():
        emb = model.embed(pixels)
        ref = hf_vit(pixel_values=pixels).last_hidden_state[:, 0]
    assert emb.shape == (3, 64)
    assert rel_err(emb, ref) < RTOL


def test_classification_checkpoint_with_prefix_loads(tmp_path: Path, pixels: torch.Tensor) -> None:
    torch.manual_seed(3)
    hf = transformers.ViTForImageClassification(tiny_vit_config(num_labels=5)).eval()
    model = load_encoder(str(save_hf(hf, tmp_path))).model
    with torch.inference_mode():
        ref = hf.vit(pixel_values=pixels).last_hidden_state
        assert rel_err(model(pixels), ref) < RTOL


def test_no_qkv_bias_config(tmp_path: Path, pixels: torch.Tensor) -> None:
    torch.manual_seed(4)
    hf = transformers.ViTModel(tiny_vit_config(qkv_bias=False, hidden_act="gelu_new"), add_pooling_layer=False).eval()
    model = load_encoder(str(save_hf(hf, tmp_path))).model
    assert model.layers[0].attn.qkv_proj.bias is None
    with torch.inference_mode():
        assert rel_err(model(pixels), hf(pixel_values=pixels).last_hidden_state) < RTOL


def test_wrong_image_size_is_refused(checkpoint: Path) -> None:
    model = load_encoder(str(checkpoint)).model
    with pytest.raises(ValueError, match="expects 32x32"):
        model(torch.zeros(1, 3, 48, 48))


def test_rename() -> None:
    value = "vit.encoder.layer.1.attention.attention.value.bias"
    assert rename_vit_weight(value) == ("layers.1.attn.qkv_proj.bias", "v")
    patch = "embeddings.patch_embeddings.projection.weight"
    assert rename_vit_weight(patch) == ("embeddings.patch_embeddings.weight", None)
    assert rename_vit_weight("encoder.layer.0.layernorm_after.weight") == ("layers.0.mlp_norm.weight", None)


def test_tensor_parallel_two_ranks_match_hf(checkpoint: Path, hf_vit, pixels: torch.Tensor) -> None:
    """Heads and MLP split over 2 ranks, weights read from the saved checkpoint (on-disk HF names)."""
    config = ViTConfig.from_hf(hf_vit.config.to_dict())
    files = safetensors_files(checkpoint)

    def build() -> ViTModel:
        model = ViTModel(config)
        assert model.load_weights(iter_safetensors(files)) == {n for n, _ in model.named_parameters()}
        return model.eval()

    outputs = run_tp2(build, lambda m: m(pixels))
    with torch.inference_mode():
        ref = hf_vit(pixel_values=pixels).last_hidden_state
    for out in outputs:
        assert rel_err(out, ref) < RTOL


def test_traces_as_one_static_graph(checkpoint: Path, pixels: torch.Tensor) -> None:
    model = load_encoder(str(checkpoint)).model
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        assert torch.allclose(compiled(pixels), model(pixels), atol=1e-6)
