"""Text in and out of a checkpoint's tokenizer (HF tokenizer.json or one built from GGUF metadata)."""

from __future__ import annotations

from graphcap.checkpoints.tokenizer_source import TokenizerSource


class Tokenizer:
    def __init__(self, source: TokenizerSource) -> None:
        self._tok = source.load()
        self.source = source

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        """The id of a token given by its text (a special token such as "<|im_end|>"), if it is one."""
        return self._tok.token_to_id(text)
