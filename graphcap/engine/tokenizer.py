"""Plain-text encode/decode through a checkpoint's tokenizer.json (no chat templates)."""

from __future__ import annotations

from pathlib import Path

from graphcap.errors import UserError


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise UserError(f"cannot load tokenizer {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
