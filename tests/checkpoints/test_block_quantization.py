"""Block-quantised weights through the public API: a GGUF's own blocks (the default for a quantised GGUF on
CPU) and float checkpoints quantised at load (`int8` -> Q8_0, `int4` -> Q4_1).

What these pin is the plumbing (which layers hold blocks, merged parts joined in order, the tied table, the
conversions, the errors); the kernels' arithmetic is pinned against float64 in tests/ops. Logits are compared
with the same model on the dequantised weights: the kernels round activations to 8 bits per 32-value block
(a relative error of at most 1/254 per value), and `int4` rounds the weights themselves to 16 levels per
block, so across two layers the logits stay within some percent of the fp32 run's scale, while a wrong part
order or a misread block moves them by their whole size."""

from __future__ import annotations

import logging

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from graphcap import LLM, SamplingParams
from graphcap.batch.forward_batch import ForwardMode
from graphcap.errors import UserError

from .gguf_files import write_gguf

ENGINE = dict(kv_cache_tokens=512, page_size=8, graph_decode="eager", graph_prefill="eager")
# Relative logit deviation allowed from activation rounding (see the module docstring): measured 0.5-6% on
# these random two-layer models; a part loaded in the wrong place or a misread block moves logits by ~100%.
MAX_RELATIVE_DEVIATION = 0.12


def _logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    runner = llm.runner
    tables = [runner.pool.alloc(runner.pool.pages_for(len(p))) for p in prompts]
    try:
        batch = runner.make_batch(ForwardMode.PREFILL, prompts, [0] * len(prompts), tables)
        with torch.inference_mode():
            return runner.model(batch.input_ids, batch.positions, batch.attn, None).float()
    finally:
        for t in tables:
            runner.pool.free(t)


def _relative_deviation(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=[("llama_tied", Q.Q8_0), ("llama_gqa", Q.Q4_1), ("qwen2", Q.Q4_0)],
                ids=["tied-Q8_0", "gqa-Q4_1", "qwen2-Q4_0"])
def gguf_file(request, tmp_path_factory, kit):
    name, qtype = request.param
    return write_gguf(kit.build_hf(name, seed=4), tmp_path_factory.mktemp("q") / f"{name}.gguf", qtype), qtype


def test_gguf_runs_on_its_own_blocks_by_default(gguf_file, kit):
    path, qtype = gguf_file
    prompts = kit.prompts(3, seed=2, lo=3, hi=14)
    with LLM(str(path), **ENGINE) as quant, LLM(str(path), quantization="none", **ENGINE) as fp32:
        model = quant.runner.model
        layer = model.layers[0]
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert linear.quant_method.qtype == qtype.name and linear.weight.dtype == torch.uint8
        assert model.embed_tokens.qtype == qtype.name
        assert model.lm_head.qtype == qtype.name  # tied to the table, or the file's own output.weight
        assert _relative_deviation(_logits(quant, prompts), _logits(fp32, prompts)) < MAX_RELATIVE_DEVIATION
        outs = quant.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_new_tokens=6))
        assert all(len(o.token_ids) == 6 or o.finish_reason == "stop" for o in outs)


@pytest.mark.parametrize("name,qtype", [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_float_checkpoint_quantised_at_load(llama_ckpt, kit, name, qtype):
    """The quantised model computes on the blocks it made: its logits equal, within activation rounding, the
    float model given the weights those blocks encode (the weights' own rounding, 16 levels per block for
    int4, is the user's choice and is not what this pins)."""
    prompts = kit.prompts(2, seed=7)
    with LLM(str(llama_ckpt.path), quantization=name, **ENGINE) as quant, \
            LLM(str(llama_ckpt.path), **ENGINE) as fp32:
        qkv = quant.runner.model.layers[1].self_attn.qkv_proj
        assert qkv.quant_method.qtype == qtype and qkv.weight.dtype == torch.uint8
        ours = dict(quant.runner.model.named_modules())
        for module_name, module in fp32.runner.model.named_modules():
            method = getattr(ours[module_name], "quant_method", None)
            if method is not None and getattr(method, "qtype", None):
                module.weight.data.copy_(method.float_weight(ours[module_name]))
        assert _relative_deviation(_logits(quant, prompts), _logits(fp32, prompts)) < MAX_RELATIVE_DEVIATION


def test_unsupported_block_types_converted_in_one_line(tmp_path, caplog):
    """Q6_K (a K-quant the kernels lack) becomes Q8_0, said once for the whole model."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = write_gguf(transformers.LlamaForCausalLM(cfg).eval(), tmp_path / "k.gguf", Q.Q6_K)
    with caplog.at_level(logging.WARNING, logger="graphcap"), LLM(str(path), **ENGINE) as llm:
        assert llm.runner.model.layers[0].mlp.down_proj.quant_method.qtype == "Q8_0"
    lines = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(lines) == 1 and "Q6_K -> Q8_0" in lines[0], lines


def test_gguf_quantization_needs_a_quantised_gguf(llama_ckpt):
    with pytest.raises(UserError, match="needs a GGUF file with quantised tensors"):
        LLM(str(llama_ckpt.path), quantization="gguf", **ENGINE)


def test_unknown_quantization_lists_the_known(llama_ckpt):
    with pytest.raises(UserError, match="int4.*int8"):
        LLM(str(llama_ckpt.path), quantization="int3", **ENGINE)
