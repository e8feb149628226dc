"""ChatTemplate against HF transformers' apply_chat_template on a ChatML (Qwen2.5) and a Llama-3-style
template, plus the ways a template or a conversation can be wrong, and where HF checkpoints keep their
template."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

import pytest

from graphcap.checkpoints.tokenizer_source import template_from_hf_dir
from graphcap.engine.chat_template import ChatTemplate
from graphcap.errors import UserError

# Qwen2.5-Instruct's template (tool instructions shortened): ChatML, a default system prompt, tools through
# `tojson`, tool calls and tool replies.
QWEN_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nFunction signatures are within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. ' }}
        {{- 'You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or
          (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama-3-style: bos_token, raise_exception on unknown roles, a date through a keyword argument (else
# strftime_now), text parts, namespace and the loopcontrols extension.
LLAMA_TEMPLATE = """\
{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- set ns = namespace(system=false) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% set ns.system = true %}{% break %}{% endif %}
{%- endfor %}
{%- if not ns.system %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + date_string + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be system, user or assistant, not ' + message.role) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
    {%- if message.content is string %}
        {{- message.content | trim }}
    {%- else %}
        {%- for part in message.content %}
            {%- if part.text == '' %}{% continue %}{% endif %}
            {{- part.text | trim }}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# No whitespace control at all: the output is right only with trim_blocks and lstrip_blocks, as under HF.
LAYOUT_TEMPLATE = """\
{% for message in messages %}
    {% if loop.first %}
{{ bos_token }}
    {% endif %}
[{{ message.role | upper }}]
{{ message.content }}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
"""

TOOLS = [{
    "type": "function",
    "function": {
        "name": "météo",
        "description": "<b>Le temps</b> & « aujourd'hui » 🌦",
        "parameters": {"type": "object", "properties": {"ville": {"type": "string"}}, "required": ["ville"]},
    },
}]

SYS = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "And 3+3?"}

# Every template handles these.
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
    "long": [SYS] + [{"role": r, "content": f"turn {i}"} for i in range(6) for r in ("user", "assistant")],
    "none_keys_dropped": [U1, {"role": "assistant", "content": "4", "tool_calls": None, "name": None}, U2],
}
QWEN_ONLY = {
    "tool_round_trip": [
        U1,
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "météo", "arguments": {"ville": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp\": \"12°C\"}"},
        {"role": "tool", "content": "second reply"},
    ],
}
LLAMA_ONLY = {
    "text_parts": [{"role": "user", "content": [
        {"type": "text", "text": "Describe "}, {"type": "text", "text": ""}, {"type": "text", "text": " 🦙"},
    ]}],
}


def _hf_tokenizer(template: str, bos: str, eos: str):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, bos: 1, eos: 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        bos_token=bos,
        eos_token=eos,
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def qwen():
    return ChatTemplate(QWEN_TEMPLATE, None, "<|im_end|>"), _hf_tokenizer(QWEN_TEMPLATE, "<s>", "<|im_end|>")


@pytest.fixture(scope="module")
def llama():
    bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    return ChatTemplate(LLAMA_TEMPLATE, bos, eos), _hf_tokenizer(LLAMA_TEMPLATE, bos, eos)


def _same_as_hf(pair, messages, add_generation_prompt: bool, **extra) -> str:
    ours, hf = pair
    expected = hf.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    before = copy.deepcopy(messages)
    got = ours.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    assert got == expected
    assert messages == before  # the template saw a copy
    return got


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS | QWEN_ONLY))
def test_qwen_matches_hf(qwen, name, add_generation_prompt):
    _same_as_hf(qwen, (CONVERSATIONS | QWEN_ONLY)[name], add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS | QWEN_ONLY))
def test_qwen_with_tools_matches_hf(qwen, name, add_generation_prompt):
    text = _same_as_hf(qwen, (CONVERSATIONS | QWEN_ONLY)[name], add_generation_prompt, tools=TOOLS)
    assert "<b>Le temps</b> & « aujourd'hui » 🌦" in text  # tojson keeps non-ASCII and does not escape HTML


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS | LLAMA_ONLY))
def test_llama_matches_hf(llama, name, add_generation_prompt):
    messages = (CONVERSATIONS | LLAMA_ONLY)[name]
    text = _same_as_hf(llama, messages, add_generation_prompt, date_string="26 Jul 2024")
    assert text.startswith("<|begin_of_text|>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["system_multi_turn", "unicode", "whitespace"])
def test_trim_and_lstrip_blocks_match_hf(name, add_generation_prompt):
    pair = ChatTemplate(LAYOUT_TEMPLATE, "<s>", "</s>"), _hf_tokenizer(LAYOUT_TEMPLATE, "<s>", "</s>")
    text = _same_as_hf(pair, CONVERSATIONS[name], add_generation_prompt)
    assert text.startswith("<s>\n[")


def test_llama_default_date_comes_from_strftime_now(llama):
    ours, _ = llama
    days = {datetime.now().strftime("%d %b %Y")}
    text = ours.render([U1])
    days.add(datetime.now().strftime("%d %b %Y"))  # the render may straddle midnight
    assert any(f"Today Date: {day}<|eot_id|>" in text for day in days)


def test_special_tokens_can_be_absent_or_overridden(qwen):
    ours = ChatTemplate("[{{ bos_token }}|{{ eos_token is defined }}]", None, None)
    assert ours.render([U1]) == "[|False]"
    assert ours.render([U1], bos_token="<B>") == "[<B>|False]"


def test_tools_and_documents_are_defined_as_under_hf():
    source = "{{ tools is defined }} {{ tools }} {{ documents is none }} {{ bos_token }} {{ unk_token is defined }}"
    pair = ChatTemplate(source, "<s>", "</s>"), _hf_tokenizer(source, "<s>", "</s>")
    assert _same_as_hf(pair, [U1], True) == "True None True <s> False"


def test_tojson_takes_hf_options():
    ours = ChatTemplate("{{ {'b': 'é', 'a': [1]} | tojson(indent=2, sort_keys=True) }}", None, None)
    assert ours.render([U1]) == json.dumps({"a": [1], "b": "é"}, indent=2, ensure_ascii=False)


def test_end_token():
    assert ChatTemplate(QWEN_TEMPLATE, None, None).end_token == "<|im_end|>"
    assert ChatTemplate(LLAMA_TEMPLATE, "<s>", "</s>").end_token == "<|eot_id|>"
    mistral = "{% for m in messages %}{{ m.content }}{{ ' </s>' if m.role == 'assistant' }}{% endfor %}"
    assert ChatTemplate(mistral, "<s>", "</s>").end_token == "</s>"
    assert ChatTemplate("{% for m in messages %}{{ m.content }}\n{% endfor %}", None, None).end_token is None
    assert ChatTemplate("{{ raise_exception('no') }}", None, None).end_token is None


# --- errors -------------------------------------------------------------------------------------------------


def _user_error(template: ChatTemplate, messages, **extra) -> str:
    with pytest.raises(UserError) as info:
        template.render(messages, **extra)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_raise_exception_carries_the_templates_message(llama):
    ours, hf = llama
    bad = [U1, {"role": "robot", "content": "beep"}]
    with pytest.raises(Exception, match="not robot"):  # HF refuses the same conversation
        hf.apply_chat_template(bad, tokenize=False)
    assert "Conversation roles must be system, user or assistant, not robot" in _user_error(ours, bad)


def test_multiline_raise_exception_is_one_line():
    ours = ChatTemplate("{{ raise_exception('first\nsecond') }}", None, None)
    assert "first second" in _user_error(ours, [U1])


@pytest.mark.parametrize("source", ["{% for m in messages %}{{ m.content }}", "{{ 1 + }}", "{% bogus %}"])
def test_syntax_error(source):
    with pytest.raises(UserError, match="does not compile") as info:
        ChatTemplate(source, None, None)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("expression", [
    "''.__class__.__mro__",
    "''.__class__.__mro__[1].__subclasses__()",
    "cycler.__init__.__globals__",
    "raise_exception.__globals__['__builtins__']",
    "messages.append(1)",
    "messages[0].update({'role': 'x'})",
    "dict.update(messages[0], {'role': 'x'})",
    "namespace(_hidden=1)",
])
def test_sandbox_refuses_escapes(expression):
    messages = [copy.deepcopy(U1)]
    _user_error(ChatTemplate("{{ " + expression + " }}", None, None), messages)
    assert messages == [U1]


@pytest.mark.parametrize("expression", ["messages.__class__", "raise_exception.__globals__", "''.__class__"])
def test_sandbox_reads_unsafe_attributes_as_undefined(expression):
    """As under HF: one unsafe attribute is an undefined value that prints as nothing; using it raises."""
    assert ChatTemplate("{{ " + expression + " }}", None, None).render([U1]) == ""


def test_setting_underscore_names_on_a_namespace_is_refused():
    ours = ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}", None, None)
    assert "namespace" in _user_error(ours, [U1])


def test_python_errors_inside_the_template_become_user_errors():
    assert "ZeroDivisionError" in _user_error(ChatTemplate("{{ 1 / 0 }}", None, None), [U1])
    assert "TypeError" in _user_error(ChatTemplate("{{ messages[0].content + 1 }}", None, None), [U1])


@pytest.mark.parametrize("messages", [
    [],
    (),
    "hello",
    None,
    {"role": "user", "content": "hi"},
    ["hi"],
    [{"content": "hi"}],
    [{"role": 1, "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": None}]}],
    [{"role": "user", "content": ["hi"]}],
    [{"role": "user", "content": "hi", "meta": object()}],
    [{"role": "user", "content": "hi", "meta": {1: "non-string key"}}],
], ids=repr)
def test_bad_messages(qwen, messages):
    _user_error(qwen[0], messages)


def test_bad_extra_argument(qwen):
    assert "chat template arguments" in _user_error(qwen[0], [U1], tools=[object()])


# --- template_from_hf_dir -----------------------------------------------------------------------------------


def _write_config(path: Path, config) -> None:
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_jinja_file_wins(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("from file ✓", encoding="utf-8")
    _write_config(tmp_path, {"chat_template": "from config"})
    assert template_from_hf_dir(tmp_path) == "from file ✓"


def test_config_string(tmp_path):
    _write_config(tmp_path, {"chat_template": "from config", "eos_token": "</s>"})
    assert template_from_hf_dir(tmp_path) == "from config"


def test_config_list_picks_default(tmp_path):
    _write_config(tmp_path, {"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]})
    assert template_from_hf_dir(tmp_path) == "plain"


def test_config_list_without_default(tmp_path):
    _write_config(tmp_path, {"chat_template": [{"name": "tool_use", "template": "tools"}]})
    with pytest.raises(UserError, match="default"):
        template_from_hf_dir(tmp_path)


def test_no_template(tmp_path):
    assert template_from_hf_dir(tmp_path) is None
    _write_config(tmp_path, {"eos_token": "</s>"})
    assert template_from_hf_dir(tmp_path) is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"chat_template": 7}'])
def test_malformed_config(tmp_path, text):
    (tmp_path / "tokenizer_config.json").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer_config.json"):
        template_from_hf_dir(tmp_path)
