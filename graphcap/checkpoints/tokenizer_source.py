"""What a checkpoint says about its tokenizer: how to build it, its chat template and special tokens.

Both checkpoint formats describe the same four things in different places (an HF directory's
tokenizer.json / tokenizer_config.json / chat_template.jinja, a GGUF file's `tokenizer.*` metadata); the
engine reads them from here without knowing the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from graphcap.common.json_file import read_json_object
from graphcap.errors import UserError

if TYPE_CHECKING:
    import tokenizers


@dataclass(frozen=True)
class TokenizerSource:
    load: Callable[[], "tokenizers.Tokenizer"]
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    origin: str  # the file a user would look at, for error messages


def hf_tokenizer_source(path: Path) -> TokenizerSource | None:
    """An HF directory's tokenizer, or None when it has no tokenizer.json."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        return None
    config = _read_object(path / "tokenizer_config.json")

    def load() -> "tokenizers.Tokenizer":
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise UserError(f"cannot load tokenizer {tok_file}: {e}") from None

    return TokenizerSource(load, template_from_hf_dir(path, config), _token_text(config.get("bos_token")),
                           _token_text(config.get("eos_token")), str(path))


def _token_text(token: object) -> str | None:
    if isinstance(token, dict):  # serialised AddedToken
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_object(file: Path) -> dict:
    return read_json_object(file) if file.is_file() else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def template_from_hf_dir(path: Path, config: dict | None = None) -> str | None:
    """The template HF's tokenizer would load from this directory, or None if the checkpoint ships none.

    Newer checkpoints keep it in chat_template.jinja, older ones inside tokenizer_config.json; HF prefers the
    file when both exist, so the same checkpoint renders the same prompt here.
    """
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_text(jinja_file)
    config_file = path / "tokenizer_config.json"
    if config is None:  # the caller may already hold tokenizer_config.json's contents
        config = _read_object(config_file)
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise UserError(f"{config_file}: 'chat_template' lists no template named 'default'")
    raise UserError(f"{config_file}: 'chat_template' must be a string or a list of named templates")
