"""Splitting at attention: N attention layers give 2N+1 pieces, the pieces between layers share one
compiled artifact, and the stitched pieces compute what the model computes."""

from __future__ import annotations

import pytest
import torch

from graphcap.attention.backend import TorchNativeAttnBackend
from graphcap.attention.metadata import build_metadata
from graphcap.compilation.backend import PiecewiseCompiler
from graphcap.compilation.config import CompilationConfig
from graphcap.executor.kv_cache import KVCache
from graphcap.models.config import ModelConfig
from graphcap.models.llama import LlamaForCausalLM


def _model(num_layers: int) -> tuple[LlamaForCausalLM, KVCache]:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=2,
        num_kv_heads=1, head_dim=16, intermediate_size=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False,
        qk_norm=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, torch.float32).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    cache = KVCache(num_layers, num_pages=8, page_size=4, num_kv_heads=1, head_dim=16, dtype=torch.float32,
                    device=torch.device("cpu"))
    cache.bind(model.attention_layers())
    for attn in model.attention_layers():
        attn.attn_backend = TorchNativeAttnBackend()
    return model, cache


def _run_split(num_layers: int, backend: str = "eager") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Trace a 3-token prefill with the token dimension dynamic; return the compile stats, output, eager."""
    model, cache = _model(num_layers)
    meta = build_metadata([[1, 2]], [0], [3], 4, torch.device("cpu"))
    ids, positions = torch.tensor([5, 9, 2]), torch.arange(3)

    def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(ids, positions, meta)

    compiler = PiecewiseCompiler(CompilationConfig(backend=backend, use_cache=False))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=compiler, fullgraph=True, dynamic=False)
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(positions, 0)
    try:
        with torch.inference_mode():
            out = compiled(ids, positions)
            ref = step(ids, positions)
    finally:
        cache.release()
    return compiler.stats(), out, ref


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_n_attention_layers_give_2n_plus_1_pieces(num_layers: int) -> None:
    stats, out, ref = _run_split(num_layers)
    assert stats["pieces"] == 2 * num_layers + 1
    assert stats["splitting_pieces"] == num_layers
    torch.testing.assert_close(out, ref)


def test_pieces_between_layers_compile_once() -> None:
    stats, _, _ = _run_split(4)
    # first piece (embedding + layer 0 up to attention), the shared middle one, the last (norm + head)
    assert stats["unique_compiles"] == 3 < stats["pieces"] - stats["splitting_pieces"]


@pytest.mark.slow
def test_inductor_pieces_match_eager() -> None:
    stats, out, ref = _run_split(2, backend="inductor")
    assert stats["compiled"] == stats["unique_compiles"] == 3
    assert stats["cache"] == "off"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
