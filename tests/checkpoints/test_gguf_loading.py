"""GGUF checkpoints that the tests write themselves (Llama, Qwen2 with biases, Qwen3 with q/k norm; F32, F16,
Q8_0, Q4_0, Q4_1 and the K-quant Q6_K), loaded by graphcap and by HF transformers from the same file:
dequantised weights must be identical, greedy tokens too, and logits must agree as fp32 allows."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from graphcap import LLM, SamplingParams
from graphcap.checkpoints.gguf import GGUFCheckpoint
from graphcap.executor.loader import resolve_source

from .gguf_files import write_gguf

# (model config name from tests/conftest.py, storage type): every architecture and every type once. Llama
# with biases is left out: HF's GGUF loader drops a llama file's bias tensors, so it cannot be the reference.
CASES = [
    ("llama_gqa", Q.F32), ("llama_tied", Q.F16), ("llama_tied", Q.Q8_0), ("qwen2", Q.Q4_0), ("qwen3", Q.Q4_1),
    ("qwen2", Q.Q8_0), ("llama_gqa", Q.Q4_1),
]


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{q.name}" for n, q in CASES])
def gguf_case(request, tmp_path_factory, kit):
    name, qtype = request.param
    hf_src = _qwen3_head_dim_128(kit) if name == "qwen3" else kit.build_hf(name, seed=3)
    path = write_gguf(hf_src, tmp_path_factory.mktemp("gguf") / f"{name}-{qtype.name}.gguf", qtype)
    return path, _load_hf(path)


def _qwen3_head_dim_128(kit):
    """HF's GGUF loader ignores attention.key_length and keeps Qwen3's default head_dim (128), so the
    reference reads only files with that head size; 128 != hidden / heads (16) still tests that graphcap
    takes head_dim from key_length."""
    import transformers

    _, cfg_cls, kwargs = kit.CONFIGS["qwen3"]
    config = getattr(transformers, cfg_cls)(**{**kwargs, "head_dim": 128})
    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(config).float().eval()
    kit.randomize(model, 3)
    return model


@pytest.fixture(scope="module")
def kquant_case(tmp_path_factory):
    """Q6_K needs rows of 256 values: a Llama whose every matrix has 256-multiple input widths."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf_src = transformers.LlamaForCausalLM(cfg).eval()
    path = write_gguf(hf_src, tmp_path_factory.mktemp("gguf") / "llama-Q6_K.gguf", Q.Q6_K)
    return path, _load_hf(path)


def _check_weights_equal(path, hf) -> None:
    ours = dict(resolve_source(str(path)).weights())
    ref = hf.state_dict()
    expected = {k for k in ref if "rotary" not in k and not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert set(ours) == expected
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), f"{name} differs from HF's dequantisation"


def _check_generation(path, hf, kit) -> None:
    prompts = kit.prompts(3, seed=5, lo=3, hi=12)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with LLM(str(path), kv_cache_tokens=512, page_size=8, graph_decode="eager", graph_prefill="eager",
             quantization="none") as llm:  # HF computes on the dequantised weights
        outs = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), generation_config=gen_cfg)[0, len(p):].tolist() for p in prompts]
    assert outs == ref


def test_weights_equal_hf_dequantisation(gguf_case):
    _check_weights_equal(*gguf_case)


def test_greedy_tokens_equal_hf(gguf_case, kit):
    _check_generation(*gguf_case, kit)


def test_kquant_weights_and_tokens_equal_hf(kquant_case, kit):
    _check_weights_equal(*kquant_case)
    _check_generation(*kquant_case, kit)


def test_quantised_blocks_kept_in_hf_row_order(gguf_case):
    """The raw blocks a quantised layer will compute on dequantise to exactly the weights loaded."""
    from gguf import GGMLQuantizationType, quants

    path, _ = gguf_case
    ckpt = GGUFCheckpoint(path)
    blocks = ckpt.blocks()
    weights = dict(ckpt.tensors())
    if GGUFCheckpoint(path)._tensors[1].tensor_type in (Q.F32, Q.F16):
        assert blocks == {}
        return
    assert blocks, "a quantised file must expose its blocks"
    for name, b in blocks.items():
        values = quants.dequantize(b.data.numpy(), GGMLQuantizationType[b.ggml_type])
        assert b.shape == tuple(weights[name].shape)
        assert torch.equal(torch.from_numpy(values), weights[name]), name
