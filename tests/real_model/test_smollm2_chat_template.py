"""SmolLM2's own chat template, read from its GGUF, renders what HF's tokenizer for that GGUF renders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from graphcap.engine.chat_template import ChatTemplate

pytestmark = pytest.mark.real_model

SYS = {"role": "system", "content": "You are a pirate."}
U1 = {"role": "user", "content": "Hello!"}
A1 = {"role": "assistant", "content": "Ahoy."}
U2 = {"role": "user", "content": "Where is the treasure?"}

CONVERSATIONS = {
    "user": [U1],
    "system_user": [SYS, U1],
    "multi_turn": [U1, A1, U2],
    "system_multi_turn": [SYS, U1, A1, U2],
    "ends_with_assistant": [SYS, U1, A1],
    "unicode": [{"role": "user", "content": "Ünïcödé: 日本語, emoji 🦙🚀, RTL עברית, zero-width \u200b."}],
    "empty_user": [{"role": "user", "content": ""}],
    "empty_assistant": [U1, {"role": "assistant", "content": ""}, U2],
    "whitespace": [{"role": "user", "content": "  line one\n\n\tline two  \n"}],
    "system_mid_conversation": [U1, A1, SYS, U2],
    "long": [SYS] + [{"role": r, "content": f"turn {i}"} for i in range(6) for r in ("user", "assistant")],
}


@pytest.fixture(scope="module")
def smollm2_template(smollm2_gguf: Path, hf_smollm2_tokenizer) -> ChatTemplate:
    import gguf

    source = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    assert source == hf_smollm2_tokenizer.chat_template  # both sides render the same template
    return ChatTemplate(source, hf_smollm2_tokenizer.bos_token, hf_smollm2_tokenizer.eos_token)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_hf(smollm2_template, hf_smollm2_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_smollm2_tokenizer.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm2_template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_end_token(smollm2_template):
    assert smollm2_template.end_token == "<|im_end|>"
