"""Incremental detokenisation for streaming: text deltas that never end in half a UTF-8 character, and stop
strings matched across token boundaries and trimmed from the output.

Each new token is decoded together with the few tokens before it (as vLLM does): byte-level BPE tokens may
hold a fraction of a character, and decoders that join words (WordPiece, SentencePiece's leading space) need
the previous token to know what the new one adds. A decode that ends in U+FFFD is an incomplete character:
nothing is emitted until the next token completes it.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # chars a stop string may still claim
        self.ids: list[int] = []
        self.text = ""  # the output so far, trimmed at a matched stop string
        self._emitted = 0  # len(text) already handed out by delta()
        self._prefix = 0  # ids[_prefix:_read] decode to text already in self.text
        self._read = 0
        self.stopped = False  # a stop string matched: the output ends here
        self.num_tokens = 0  # tokens consumed up to (and including) the one that completed a stop string

    def add(self, token_id: int, count_only: bool = False) -> None:
        """Take one sampled token. `count_only`: count it but keep its text out (a stop token id)."""
        if self.stopped:
            return
        self.num_tokens += 1
        if count_only:
            return
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return  # a special token, or a character still incomplete
        start = max(0, len(self.text) - self._hold)
        self.text += new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1:  # the earliest match wins: later stops search the trimmed text
                self.text = self.text[:at]
                self.stopped = True

    def flush(self) -> None:
        """The output ended: whatever is left undecoded (a character the model never completed) goes out as is."""
        if self.stopped or self._read == len(self.ids):
            return
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text):]
        self._prefix = self._read = len(self.ids)

    def delta(self, final: bool = False) -> str:
        """The text not yet handed out. Until the output ends, the last characters that could still begin a
        stop string are held back."""
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out
