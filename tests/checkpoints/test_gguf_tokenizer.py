"""`build_tokenizer` on small hand-written GGUF tokenizer metadata: no checkpoint needed."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from graphcap.checkpoints.gguf_tokenizer import build_tokenizer
from graphcap.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

# A byte-level BPE vocabulary: three control tokens, one user-defined, the 256 byte characters, the
# tokens the merges make, and "zz", which no merge makes.
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3", "Ġ +"]
_BPE_TOKENS = (
    _SPECIALS
    + ["<think>"]
    + sorted(pre_tokenizers.ByteLevel.alphabet())
    + [m.replace(" ", "") for m in _MERGES]
    + ["zz"]
)
_BPE_TYPES = [CONTROL] * 3 + [USER_DEFINED] + [NORMAL] * (len(_BPE_TOKENS) - 4)


def gpt2_metadata(**overrides) -> dict:
    """The toy byte-level vocabulary's metadata; an override of None leaves that key out."""
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": list(_BPE_TOKENS),
        "tokenizer.ggml.token_type": list(_BPE_TYPES),
        "tokenizer.ggml.merges": list(_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    metadata.update(overrides)
    return {k: v for k, v in metadata.items() if v is not None}


def pieces(tokenizer, text: str, add_special_tokens: bool = False) -> list[str]:
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens


def test_merges_and_byte_level_spaces():
    tokenizer = build_tokenizer(gpt2_metadata())
    assert pieces(tokenizer, "hello world") == ["hello", "Ġworld"]
    assert tokenizer.decode(tokenizer.encode("hello world").ids) == "hello world"
    assert tokenizer.decode(tokenizer.encode("héllo\tw 🙂").ids) == "héllo\tw 🙂"


@pytest.mark.parametrize(
    "pre, text, expected",
    [
        ("gpt-2", "x 123", ["x", "Ġ", "123"]),
        ("smollm", "x 123", ["x", "Ġ", "1", "2", "3"]),  # every digit on its own
        ("qwen2", "x 123", ["x", "Ġ", "1", "2", "3"]),
        ("gpt-2", "4123", ["4", "123"]),
        ("llama-bpe", "4123", ["4", "12", "3"]),  # digits in threes: "412", "3"
        ("gpt-2", "x +", ["x", "Ġ+"]),
        ("default", "x +", ["x", "Ġ", "+"]),  # punctuation split off first, its space left alone
        ("gpt-2", "zz", ["z", "z"]),
        ("llama-bpe", "zz", ["zz"]),  # a word that is a token is taken whole, merges or not
    ],
)
def test_pre_tokenizer_follows_the_pre_name(pre, text, expected):
    assert pieces(build_tokenizer(gpt2_metadata(**{"tokenizer.ggml.pre": pre})), text) == expected


def test_no_pre_name_means_llama_cpp_default():
    without = build_tokenizer(gpt2_metadata(**{"tokenizer.ggml.pre": None}))
    assert pieces(without, "x +") == ["x", "Ġ", "+"]


def test_control_and_user_defined_tokens_are_matched_whole():
    tokenizer = build_tokenizer(gpt2_metadata())
    assert tokenizer.encode("<|im_start|>hello<|im_end|>").ids == [1, _BPE_TOKENS.index("hello"), 2]
    assert tokenizer.encode("<think>hello").ids == [3, _BPE_TOKENS.index("hello")]
    ids = tokenizer.encode("<|im_start|><think>hello<|im_end|>").ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|><think>hello<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>hello"  # user-defined is text


def test_bos_and_eos_follow_the_flags():
    hello = _BPE_TOKENS.index("hello")
    plain = build_tokenizer(gpt2_metadata())
    assert plain.encode("hello", add_special_tokens=True).ids == [hello]
    bos = build_tokenizer(gpt2_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert bos.encode("hello", add_special_tokens=True).ids == [1, hello]
    assert bos.encode("hello", add_special_tokens=False).ids == [hello]
    assert bos.encode("", add_special_tokens=True).ids == [1]
    both = build_tokenizer(
        gpt2_metadata(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    )
    assert both.encode("hello", add_special_tokens=True).ids == [1, hello, 2]


def test_bos_eos_texts_need_not_parse_as_template_pieces():
    tokens = ["<|begin:of text|>" if t == "<|im_start|>" else t for t in _BPE_TOKENS]
    flags = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    tokenizer = build_tokenizer(gpt2_metadata(**{"tokenizer.ggml.tokens": tokens, **flags}))
    encoding = tokenizer.encode("hello", "hello")
    assert encoding.tokens == ["<|begin:of text|>", "hello", "<|im_end|>"] * 2
    assert encoding.type_ids == [0, 0, 0, 1, 1, 1]


def test_bos_default_without_the_flag_is_llama_cpps():
    """No add_bos_token: llama.cpp adds BOS for the Llama-3 family of pre names only."""
    hello = _BPE_TOKENS.index("hello")
    llama3 = build_tokenizer(
        gpt2_metadata(**{"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": None})
    )
    assert llama3.encode("hello").ids == [1, hello]
    gpt2 = build_tokenizer(gpt2_metadata(**{"tokenizer.ggml.add_bos_token": None}))
    assert gpt2.encode("hello").ids == [hello]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tokenizer.ggml.model": "bert"}, "'bert'"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "'no-such-pre'"),
        ({"tokenizer.ggml.pre": "deepseek-llm"}, "'deepseek-llm'"),  # llama.cpp knows it; not rebuilt here
        ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
        ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens is empty"),
        ({"tokenizer.ggml.tokens": ["a", 1]}, "tokenizer.ggml.tokens must be a list of strings"),
        ({"tokenizer.ggml.token_type": _BPE_TYPES[:-1]}, f"{len(_BPE_TYPES) - 1} token types"),
        ({"tokenizer.ggml.token_type": [9] * len(_BPE_TYPES)}, "token_type must be a list of types"),
        ({"tokenizer.ggml.tokens": _BPE_TOKENS + ["hello"], "tokenizer.ggml.token_type": _BPE_TYPES + [1]},
         "'hello' is listed twice"),
        ({"tokenizer.ggml.merges": ["hello"]}, "merge 'hello'"),
        ({"tokenizer.ggml.merges": ["qq zz"]}, "qq"),  # a merge of a token that is not in the vocabulary
        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None},
         "no tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 10**6},
         "bos_token_id = 1000000"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "not a boolean"),
    ],
)
def test_bad_metadata_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("|", r"\|")):
        build_tokenizer(gpt2_metadata(**overrides))


# A SentencePiece ("llama") vocabulary: <unk>, BOS/EOS, the 256 byte tokens, then scored pieces.
_SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello",
               "▁w", "or", "▁wor", "ld", "▁world", "▁▁", "lo", "hel"]
_SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SPM_PIECES
_SPM_TYPES = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(_SPM_PIECES)
# distinct scores, so which pair joins first is never a tie
_SPM_SCORES = [0.0] * 259 + [-float(i) for i in range(len(_SPM_PIECES))]


def spm_metadata(**overrides) -> dict:
    """The toy SentencePiece vocabulary's metadata; an override of None leaves that key out."""
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(_SPM_TOKENS),
        "tokenizer.ggml.token_type": list(_SPM_TYPES),
        "tokenizer.ggml.scores": list(_SPM_SCORES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    metadata.update(overrides)
    return {k: v for k, v in metadata.items() if v is not None}


def llama_cpp_spm(text: str, add_space_prefix: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenization, written out plainly: cut out the special tokens; put a
    space before each remaining run of text; spell spaces as "▁"; join the adjacent pair that makes the
    best-scored token (leftmost on a tie) until none does; a leftover character becomes its UTF-8 bytes."""
    index = {token: i for i, token in enumerate(_SPM_TOKENS)}
    score = dict(zip(_SPM_TOKENS, _SPM_SCORES))
    specials = sorted((t for t, kind in zip(_SPM_TOKENS, _SPM_TYPES) if kind in (UNKNOWN, CONTROL)), key=len,
                      reverse=True)
    fragments: list[str | int] = [text] if text else []
    for special in specials:
        split: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                split.append(fragment)
                continue
            for n, part in enumerate(fragment.split(special)):
                if n:
                    split.append(index[special])
                if part:
                    split.append(part)
        fragments = split
    ids = []
    for fragment in fragments:
        if isinstance(fragment, int):
            ids.append(fragment)
            continue
        symbols = list(((" " if add_space_prefix else "") + fragment).replace(" ", "▁"))
        while True:
            pairs = enumerate(itertools.pairwise(symbols))
            joins = [(score[a + b], -i) for i, (a, b) in pairs if a + b in index]
            if not joins:
                break
            i = -max(joins)[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for symbol in symbols:
            in_bytes = [index[f"<0x{byte:02X}>"] for byte in symbol.encode()]
            ids += [index[symbol]] if symbol in index else in_bytes
    return ids


_SPM_PARTS = ["h", "e", "l", "o", "w", "r", "d", " ", "  ", "é", "x", "hello", "<s>", "</s>", "<unk>"]
_SPM_TEXT = st.lists(st.sampled_from(_SPM_PARTS), max_size=12).map("".join)


_SPM_TOKENIZERS: dict = {}


def _spm_tokenizer(add_space_prefix: bool):
    """Built once per flag: hypothesis calls the test many times."""
    if add_space_prefix not in _SPM_TOKENIZERS:
        metadata = spm_metadata(**{"tokenizer.ggml.add_space_prefix": add_space_prefix})
        _SPM_TOKENIZERS[add_space_prefix] = build_tokenizer(metadata)
    return _SPM_TOKENIZERS[add_space_prefix]


@settings(max_examples=150, deadline=None)
@given(text=_SPM_TEXT, add_space_prefix=st.booleans())
def test_sentencepiece_matches_llama_cpp_algorithm(text, add_space_prefix):
    tokenizer = _spm_tokenizer(add_space_prefix)
    assert tokenizer.encode(text, add_special_tokens=False).ids == llama_cpp_spm(text, add_space_prefix)


def test_sentencepiece_examples():
    tokenizer = build_tokenizer(spm_metadata())
    assert pieces(tokenizer, "hello world", add_special_tokens=True) == ["<s>", "▁hello", "▁world"]
    assert pieces(tokenizer, "héllo") == ["▁h", "<0xC3>", "<0xA9>", "llo"]  # é is not in the vocabulary
    # one more space in front, even of text that starts with one, and after every special token
    assert pieces(tokenizer, " hello") == ["▁", "▁hello"]
    assert pieces(tokenizer, "<s>hello") == ["<s>", "▁hello"]
    assert tokenizer.decode(tokenizer.encode("hello world héllo").ids) == "hello world héllo"
    no_prefix = build_tokenizer(spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert pieces(no_prefix, "hello world") == ["he", "llo", "▁world"]
    assert no_prefix.decode(no_prefix.encode("hello world").ids) == "hello world"


def test_sentencepiece_bos_default_and_flags():
    hello = _SPM_TOKENS.index("▁hello")
    assert build_tokenizer(spm_metadata()).encode("hello").ids == [1, hello]  # llama.cpp's default
    no_bos = build_tokenizer(spm_metadata(**{"tokenizer.ggml.add_bos_token": False}))
    assert no_bos.encode("hello").ids == [hello]
    eos = build_tokenizer(spm_metadata(**{"tokenizer.ggml.add_eos_token": True}))
    assert eos.encode("hello").ids == [1, hello, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tokenizer.ggml.scores": None}, "no tokenizer.ggml.scores"),
        ({"tokenizer.ggml.scores": _SPM_SCORES[:5]}, "5 scores"),
        ({"tokenizer.ggml.scores": ["x"] * len(_SPM_SCORES)}, "scores must be a list of numbers"),
        ({"tokenizer.ggml.unknown_token_id": -1}, "unknown_token_id = -1"),
    ],
)
def test_bad_sentencepiece_metadata_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message):
        build_tokenizer(spm_metadata(**overrides))


def test_sentencepiece_matches_hf_where_hf_follows_llama_cpp(tmp_path):
    """HF transformers loads the same vocabulary from a GGUF file. It differs from llama.cpp on text
    that starts with a space and on text after a special token (its Metaspace adds no "▁" there), so
    the texts compared here avoid both."""
    pytest.importorskip("transformers")
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    path = tmp_path / "toy.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(_SPM_TOKENS)
    writer.add_token_types(_SPM_TYPES)
    writer.add_token_scores(_SPM_SCORES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_tensor("token_embd.weight", np.zeros((len(_SPM_TOKENS), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    metadata = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    ours = build_tokenizer(metadata)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = ["hello world", "hello", "world hello", "héllo wörld", "hellohello", "x y  z", "lo he ll",
             "hello<s>", "hello  world  ", "ééé"]
    for text in texts:
        assert ours.encode(text).ids == hf.encode(text), text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=True) == hf.decode(
            hf.encode(text), skip_special_tokens=True
        ), text
