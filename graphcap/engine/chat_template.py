"""Checkpoints' chat templates: the jinja2 programs that turn a conversation into the model's prompt text.

The rendering follows HF transformers' `apply_chat_template(..., tokenize=False)` to the byte: the model was
trained on that text, and drift (a lost newline, other JSON spacing) degrades answers without any error to
notice. The template comes with the checkpoint, so it is untrusted code: it runs only in jinja2's immutable
sandbox.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from graphcap.errors import UserError

# An assistant reply that no template alters, rendered to see which tag a template writes after a reply.
_PROBE_REPLY = "graphcap-end-of-turn-probe"
_TAG = re.compile(r"\s*(<[^<>\s]{1,64}>)")
_JSON_SCALARS = (str, int, float, bool, type(None))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _raise_exception(message: Any) -> NoReturn:
    """Templates call this to refuse a conversation they cannot format (say, roles that do not alternate)."""
    raise UserError(f"chat template rejected the conversation: {_one_line(str(message))}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    """Replaces jinja's own filter, which escapes HTML characters and has no `ensure_ascii`: tool schemas must
    reach the model exactly as HF writes them."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    """Templates that print today's date (Llama 3.1's system header) read the clock through this."""
    return datetime.now().strftime(format)


class _TemplateDict:
    """Stands in for the `dict` global: the real type would let a template call `dict.update(message, ...)` on
    the class, which the immutable sandbox only checks for calls made through an instance."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace` stores any name; underscore names are where sandbox escapes start, so refuse them
    when they are stored rather than trust every later read to be checked."""

    # `self` travels inside *args, so that `namespace(self=...)` still works, as in jinja's own.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    """The options HF compiles with: templates are written against them (trim_blocks alone moves newlines)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return env


def _plain(value: Any, where: str) -> Any:
    """A fresh copy made of JSON types only: no caller object (with methods the sandbox cannot know are
    dangerous) reaches the template, and nothing the template does can touch the caller's data."""
    if type(value) in _JSON_SCALARS:
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise UserError(f"{where}: object keys must be strings")
        return {key: _plain(item, where) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    raise UserError(f"{where}: a chat template cannot be given a {type(value).__name__}")


def _is_text_parts(content: Any) -> bool:
    """OpenAI clients may send content as a list of typed parts; a text-only model can take only text ones."""
    return isinstance(content, (list, tuple)) and all(
        isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    )


def _conversation(messages: Any) -> list[dict[str, Any]]:
    """Checked here so that a malformed request fails with a message naming the bad entry, not with whatever
    the template trips over halfway through."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UserError("a conversation must be a non-empty list of messages")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UserError(
                f"message {i} must be an object with 'role' and 'content', not {type(message).__name__}"
            )
        if not isinstance(message.get("role"), str):
            raise UserError(f"message {i}: 'role' must be a string")
        content = message.get("content")
        if not isinstance(content, str) and not _is_text_parts(content):
            raise UserError(
                f"message {i}: 'content' must be a string or a list of {{'type': 'text', 'text': ...}} parts"
            )
        # HF drops None-valued keys: templates test `'tool_calls' in message` and would print "None".
        conversation.append(_plain({k: v for k, v in message.items() if v is not None}, f"message {i}"))
    return conversation


class ChatTemplate:
    """A checkpoint's jinja2 chat template, compiled once in a sandbox."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            message = _one_line(e.message or "")
            raise UserError(f"chat template does not compile (line {e.lineno}): {message}") from None
        # As in HF, a token the tokenizer lacks stays undefined (renders as ""), never None (renders "None").
        specials = {"bos_token": bos_token, "eos_token": eos_token}
        self._special = {name: token for name, token in specials.items() if token is not None}

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        context = {
            **self._special,
            # HF always passes these two, so a template's `tools is defined` is true even without tools.
            "tools": None,
            "documents": None,
            **_plain(extra, "chat template arguments"),
            "messages": _conversation(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(context)
        except UserError:
            raise
        except Exception as e:
            # The template is the checkpoint's code: whatever it trips over, the user must see one line.
            raise UserError(f"chat template failed: {type(e).__name__}: {_one_line(str(e))}") from None

    @cached_property
    def end_token(self) -> str | None:
        """The tag the template writes after an assistant reply, e.g. "<|im_end|>"; None if it writes none.

        ChatML checkpoints often declare "<|endoftext|>" as eos while the model ends its turn with
        "<|im_end|>", so generation must stop on both or it runs on into a turn it invents. Rendering a probe
        reply finds the tag for templates never seen before, where matching template names would not.
        """
        user = {"role": "user", "content": "hi"}
        reply = {"role": "assistant", "content": _PROBE_REPLY}
        for conversation in ([user, reply], [{"role": "system", "content": "hi"}, user, reply]):
            try:
                text = self.render(conversation, add_generation_prompt=False)
            except UserError:  # some templates insist on a system message; try the other shape
                continue
            _, probe, after = text.rpartition(_PROBE_REPLY)
            tag = _TAG.match(after) if probe else None
            return tag.group(1) if tag else None
        return None
