"""A standalone-compiled segment serves every layer and every token count, including one token, and is
called as its generated code only when that code agrees with the compiled artifact."""

from __future__ import annotations

import pytest
import torch

from graphcap import LLM
from graphcap.graph.backends import segment_compile
from graphcap.graph.backends.segment_compile import CompiledSegment
from graphcap.models.llama import last_segment, middle_segment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layers():
    with LLM("tiny", kv_cache_tokens=256, graph_decode="eager", graph_prefill="eager") as llm:
        yield list(llm.runner.model.layers)


@torch.inference_mode()
def test_one_compiled_middle_segment_matches_eager_for_every_layer_and_size(layers) -> None:
    segment = CompiledSegment(middle_segment, num_modules=2, options={})
    gen = torch.Generator().manual_seed(0)
    hidden = layers[0].input_layernorm.weight.shape[0]
    for tokens in (37, 1, 128):
        positions = torch.randint(0, 500, (tokens,), generator=gen)
        attn_out, residual = (torch.randn(tokens, hidden, generator=gen) for _ in range(2))
        for i in (0, 5, len(layers) - 2):
            got = segment(layers[i], layers[i + 1], positions, attn_out, residual)
            want = middle_segment(layers[i], layers[i + 1], positions, attn_out, residual)
            assert len(got) == len(want) == 4
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert len(segment._flat) == 3  # weights resolved once per layer pair, then reused
    assert segment.direct  # every call after the first ran the generated code without the artifact's wrappers


@torch.inference_mode()
def test_single_output_segment_returns_a_tensor(layers) -> None:
    segment = CompiledSegment(last_segment, num_modules=1, options={})
    attn_out, residual = torch.randn(9, 64), torch.randn(9, 64)
    got = segment(layers[-1], attn_out, residual)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, last_segment(layers[-1], attn_out, residual), atol=1e-5, rtol=1e-5)



class _WrongCode:
    """Stands in for generated code that does not agree with the artifact."""

    @staticmethod
    def current_callable(args):
        return [torch.zeros(1)]


@torch.inference_mode()
def test_generated_code_that_disagrees_is_not_adopted(layers, monkeypatch) -> None:
    monkeypatch.setattr(segment_compile, "_generated_code", lambda artifact: _WrongCode())
    segment = CompiledSegment(last_segment, num_modules=1, options={})
    attn_out, residual = torch.randn(5, 64), torch.randn(5, 64)
    for _ in range(2):
        got = segment(layers[0], attn_out, residual)
        torch.testing.assert_close(got, last_segment(layers[0], attn_out, residual), atol=1e-5, rtol=1e-5)
    assert not segment.direct
