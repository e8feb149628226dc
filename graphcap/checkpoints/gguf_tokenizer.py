"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json, only the pieces llama.cpp needs: the vocabulary, each token's type,
the merges or scores, and a few names and flags. Those keys are written for llama.cpp, so they mean
what llama.cpp's `llama-vocab.cpp` makes of them, and that is what is rebuilt here. In particular
`tokenizer.ggml.pre` names the regexes that cut text into words before BPE; HF transformers' own
GGUF conversion ignores some of those names (SmolLM's "smollm" among them) and so splits digit runs
differently from the tokenizer the model was trained with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphcap.errors import UserError

if TYPE_CHECKING:
    import tokenizers

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_UNDEFINED, _NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = range(7)

# The word-splitting regexes llama.cpp applies for each family of `tokenizer.ggml.pre` names. Each is
# applied in turn to every piece the previous ones left, keeping both the matches and the text between.
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_WORDS = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_WORDS = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp tokenizes a BPE vocabulary with this `tokenizer.ggml.pre` name."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is taken whole, merges or not
    add_bos: bool = False  # the default when the file has no tokenizer.ggml.add_bos_token


_GPT2 = _PreTokenizer((_GPT2_WORDS,))
_LLAMA3 = _PreTokenizer((_LLAMA3_WORDS,), ignore_merges=True, add_bos=True)

# Only the names whose every effect on encoding in llama.cpp is reproduced here; llama.cpp knows more.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(
        ("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "trillion",
         "granite-docling", "exaone4"),
        _GPT2,
    ),
    # digits one by one, then GPT-2's words
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
        _PreTokenizer((r"\p{N}", _GPT2_WORDS)),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3_WORDS,))),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
        _PreTokenizer((_QWEN2_WORDS,)),
    ),
}

_SPACE = "\u2581"  # how a SentencePiece vocabulary spells a space


def build_tokenizer(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """The tokenizer llama.cpp would run for this metadata (`tokenizer.ggml.model` "gpt2" or "llama").

    Control, unknown and user-defined tokens are added tokens, matched whole in the text before the
    model sees it, as llama.cpp does when it parses special tokens. BOS/EOS are added by the
    post-processor, so only when encoding with `add_special_tokens=True`.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise UserError("GGUF metadata has no tokenizer.ggml.model, so it describes no tokenizer")
    if model == "gpt2":
        return _byte_level_bpe(metadata)
    if model == "llama":
        return _sentencepiece_bpe(metadata)
    raise UserError(
        f"GGUF tokenizer type {model!r} (tokenizer.ggml.model) is not supported; supported: 'gpt2', 'llama'"
    )


def _byte_level_bpe(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    from tokenizers import Regex, decoders, pre_tokenizers

    pre_name = metadata.get("tokenizer.ggml.pre") or "default"  # llama.cpp's choice when there is none
    pre = _PRE_TOKENIZERS.get(pre_name) if isinstance(pre_name, str) else None
    if pre is None:
        raise UserError(
            f"GGUF pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    tokens, types = _vocabulary(metadata)
    merges = [_merge_pair(m) for m in _string_list(metadata, "tokenizer.ggml.merges")]
    tokenizer = _bpe_tokenizer(tokens, merges, ignore_merges=pre.ignore_merges)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, types)
    _set_post_processor(tokenizer, metadata, tokens, default_add_bos=pre.add_bos)
    return tokenizer


def _sentencepiece_bpe(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """llama.cpp's SentencePiece tokenizer, as BPE: repeatedly joining the adjacent pair that forms the
    best-scored token is what BPE does with merges ranked by the merged token's score; characters
    left outside the vocabulary become <0xNN> byte tokens.

    Spaces become "\u2581" and, with add_space_prefix (llama.cpp's default here), every run of text
    between added tokens gets one more in front, even when it already starts with a space: a
    normalizer does that (HF's Metaspace would skip text that starts with a space, and text after the
    first added token). No pre-tokenizer: llama.cpp joins across spaces too.
    """
    from tokenizers import decoders, normalizers

    tokens, types = _vocabulary(metadata)
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise UserError("GGUF tokenizer metadata has no tokenizer.ggml.scores, which 'llama' tokenizers need")
    if not isinstance(scores, list) or not all(isinstance(s, (int, float)) for s in scores):
        raise UserError("GGUF tokenizer metadata: tokenizer.ggml.scores must be a list of numbers")
    if len(scores) != len(tokens):
        raise UserError(
            f"GGUF tokenizer metadata: {len(scores)} scores (tokenizer.ggml.scores) for {len(tokens)} tokens"
        )
    unk_id = _token_id(metadata, "tokenizer.ggml.unknown_token_id", len(tokens), default=0)
    unk_token = tokens[unk_id] if unk_id is not None else None
    tokenizer = _bpe_tokenizer(
        tokens, _merges_from_scores(tokens, scores), unk_token=unk_token, fuse_unk=True, byte_fallback=True
    )
    add_space_prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", default=True)
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(_SPACE)] if add_space_prefix else []) + [normalizers.Replace(" ", _SPACE)]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", left=1)] if add_space_prefix else [])
    )
    _add_special_tokens(tokenizer, tokens, types)
    _set_post_processor(tokenizer, metadata, tokens, default_add_bos=True)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every way to cut a token into two tokens, best-scored token first: BPE applies the best-ranked
    merge present, so it then joins the pair that makes the best-scored token, as llama.cpp does."""
    vocab = set(tokens)
    ranked = []
    for index, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _vocabulary(metadata: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """The tokens (an empty one renamed, as llama.cpp does, so it can never match) and their types."""
    tokens = _string_list(metadata, "tokenizer.ggml.tokens")
    if not tokens:
        raise UserError("GGUF tokenizer metadata: tokenizer.ggml.tokens is empty")
    tokens = [token or f"[EMPTY_{index}]" for index, token in enumerate(tokens)]
    seen: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in seen:
            raise UserError(
                f"GGUF tokenizer metadata: token {token!r} is listed twice (ids {seen[token]} and {index})"
            )
        seen[token] = index
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:  # llama.cpp then takes every token as normal
        return tokens, [_NORMAL] * len(tokens)
    if not isinstance(types, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and _UNDEFINED <= t <= _BYTE for t in types
    ):
        raise UserError("GGUF tokenizer metadata: tokenizer.ggml.token_type must be a list of types 0-6")
    if len(types) != len(tokens):
        raise UserError(
            f"GGUF tokenizer metadata: {len(types)} token types (tokenizer.ggml.token_type) "
            f"for {len(tokens)} tokens"
        )
    return tokens, types


def _add_special_tokens(tokenizer: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """llama.cpp cuts control, unknown and user-defined tokens out of the text before tokenizing the rest.

    Only control and unknown tokens are special (dropped by `decode(skip_special_tokens=True)`, as
    llama.cpp's detokenizer drops them); a user-defined token like "<think>" is text that decodes.
    """
    from tokenizers import AddedToken

    special = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (_CONTROL, _UNKNOWN)
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, types)
        if kind == _USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)


def _set_post_processor(
    tokenizer: tokenizers.Tokenizer, metadata: Mapping[str, Any], tokens: list[str], default_add_bos: bool
) -> None:
    """BOS/EOS as llama.cpp adds them: the file's add_bos_token/add_eos_token, else llama.cpp's default
    for this kind of tokenizer."""
    from tokenizers import processors

    add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", default=default_add_bos)
    add_eos = _flag(metadata, "tokenizer.ggml.add_eos_token", default=False)
    bos = _required_id(metadata, "bos", tokens) if add_bos else None
    eos = _required_id(metadata, "eos", tokens) if add_eos else None
    if bos is None and eos is None:
        return
    # The template names the tokens "BOS"/"EOS", not by their text, which need not parse as a template piece
    first = ["BOS"] if bos is not None else []
    last = ["EOS"] if eos is not None else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=first + ["$A"] + last,
        pair=first + ["$A"] + last + [f"{piece}:1" for piece in first + ["$B"] + last],
        special_tokens=[
            {"id": name, "ids": [i], "tokens": [tokens[i]]}
            for name, i in (("BOS", bos), ("EOS", eos))
            if i is not None
        ],
    )


def _required_id(metadata: Mapping[str, Any], name: str, tokens: list[str]) -> int:
    key = f"tokenizer.ggml.{name}_token_id"
    token_id = _token_id(metadata, key, len(tokens), default=None)
    if token_id is None:
        raise UserError(f"GGUF tokenizer metadata: tokenizer.ggml.add_{name}_token is true, but no {key}")
    return token_id


def _token_id(metadata: Mapping[str, Any], key: str, n_tokens: int, default: int | None) -> int | None:
    value = metadata.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_tokens:
        raise UserError(f"GGUF tokenizer metadata: {key} = {value!r} is not a token id below {n_tokens}")
    return value


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"GGUF tokenizer metadata: {key} = {value!r} is not a boolean")
    return value


def _string_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        raise UserError(f"GGUF tokenizer metadata has no {key}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"GGUF tokenizer metadata: {key} must be a list of strings")
    return value


def _merge_pair(merge: str) -> tuple[str, str]:
    """Cut at the first space after the first character, as llama.cpp does, so a token that is itself
    a space (in a vocabulary that is not byte-level) can still be the left half."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise UserError(f"GGUF tokenizer metadata: merge {merge!r} (tokenizer.ggml.merges) is not two tokens")
    return merge[:cut], merge[cut + 1:]


def _bpe_tokenizer(tokens: list[str], merges: list[tuple[str, str]], **options: Any) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, models

    vocab = {token: index for index, token in enumerate(tokens)}
    try:
        return Tokenizer(models.BPE(vocab, merges, **options))
    except Exception as e:  # tokenizers' bare Exception, e.g. for a merge of tokens outside the vocabulary
        raise UserError(f"GGUF tokenizer metadata: {e}") from None
