"""graphcap's Llama with custom ops and FP8 linears: RMSNorm+quant fuses once per norm feeding a quantised
linear (input_layernorm -> qkv_proj and post_attention_layernorm -> gate_up_proj in every layer).

The compiled body is compared with eager loosely (relative error below 2%): Inductor fuses the rotary
embedding's float math differently from eager, and one-ulp changes can flip an fp8 rounding downstream.
"""

from __future__ import annotations

import pytest
import torch

from graphcap.attention.backend import TorchNativeAttnBackend
from graphcap.attention.metadata import build_metadata
from graphcap.compilation.config import PassConfig
from graphcap.executor.kv_cache import KVCache
from graphcap.layers.custom_op import enabled_custom_ops
from graphcap.layers.linear import LinearBase
from graphcap.layers.quantization import quant_method_factory
from graphcap.models.config import ModelConfig
from graphcap.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.slow


def _tiny_llama(num_layers: int) -> LlamaForCausalLM:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=2,
        num_kv_heads=1, head_dim=16, intermediate_size=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=True, attention_bias=False,
        qk_norm=False,
    )
    g = torch.Generator().manual_seed(0)
    with enabled_custom_ops({"all"}):
        model = LlamaForCausalLM(cfg, torch.float32, quant_method_factory("fp8"))
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=g) * 0.1)
            module.quant_method.process_weights_after_loading(module)
    model.embed_tokens.weight.data.copy_(torch.randn(model.embed_tokens.weight.shape, generator=g))
    return model


def test_rms_quant_fuses_each_norm_feeding_a_quantised_linear(compiler, count_ops) -> None:
    layers = 2
    model = _tiny_llama(layers)
    cache = KVCache(layers, num_pages=4, page_size=4, num_kv_heads=1, head_dim=16, dtype=torch.float32,
                    device=torch.device("cpu"))
    cache.bind(model.attention_layers())
    for attn in model.attention_layers():
        attn.attn_backend = TorchNativeAttnBackend()  # default metadata: the opaque attention op
    meta = build_metadata([[1, 2]], [0], [5], 4, torch.device("cpu"))
    ids = torch.tensor([3, 7, 1, 9, 4])
    positions = torch.arange(5)

    def body(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.body(hidden, positions, meta)

    try:
        with torch.no_grad():
            hidden = model.embed(ids)
            eager = body(hidden, positions)
            out, manager = compiler(body, (hidden, positions), PassConfig())
    finally:
        cache.release()
    assert manager.match_counts()["rms_quant_fusion"] == 2 * layers
    assert manager.match_counts()["act_quant_fusion"] == 0  # down_proj quantises dynamically: no fused op
    counts = count_ops(manager.graphs[0])
    assert counts["graphcap::rms_norm_dynamic_per_token_fp8_quant"] == 1  # layer 0's input_layernorm
    assert counts["graphcap::fused_add_rms_norm_dynamic_per_token_fp8_quant"] == 2 * layers - 1
    assert counts["graphcap::rms_norm"] == counts["graphcap::fused_add_rms_norm"] == 0
    assert counts["graphcap::dynamic_per_token_scaled_fp8_quant"] == 2 * layers  # o_proj and down_proj inputs
    assert ((out - eager).norm() / eager.norm()).item() < 0.02
