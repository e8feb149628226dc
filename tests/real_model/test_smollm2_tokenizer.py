"""graphcap's GGUF tokenizer on the real SmolLM2 file, against HF transformers' tokenizer for the same file.

HF's GGUF conversion ignores `tokenizer.ggml.pre` for this file ("smollm") and splits words with plain
GPT-2 regex; llama.cpp, and SmolLM2's own tokenizer.json (a `Digits(individual_digits=True)` split before
`ByteLevel`), split every digit off on its own. The model was trained on the latter, so graphcap follows
the pre name. The reference here is therefore HF's tokenizer with that one piece put back, and a second
check pins that this is the only difference: on text without digits, graphcap equals HF unpatched.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from graphcap.checkpoints.gguf_tokenizer import build_tokenizer

pytestmark = pytest.mark.real_model

_PROSE = [
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right, but we'd better check what they've done.",
    "DON'T SHOUT; it's rude. I'LL stop, I'VE heard.",
    "She said: \"Yes.\" Then she left...",
    "What?! Really?? No way!!!",
    "Hyphenated-words and snake_case and camelCase and PascalCase.",
    "e-mail me at someone@example.com or visit https://example.org/path?q=1&r=two#frag",
    "Parentheses (like these) [and these] {and these} <and these>.",
    "Mr. Smith & Mrs. Jones' dog's bone.",
    "A sentence with a trailing space ",
    " A sentence with a leading space",
    "    Four leading spaces",
    "one\ttab",
    "two\t\ttabs",
    "line one\nline two",
    "line one\r\nline two (windows)",
    "paragraph one\n\nparagraph two",
    "many\n\n\n\nnewlines",
    "ends with newline\n",
    "ends with spaces   ",
    "words   separated    by     runs",
    "mixed \t \n whitespace \r\n  here",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ALL CAPS HEADLINE ABOUT NOTHING",
    "lower case only words here",
    "Quotes: 'single', \"double\", `backtick`, «guillemets», „German“.",
    "Ellipsis… em—dash – en-dash",
    "Bullet points:\n- one\n- two\n* three",
    "Markdown **bold** _italic_ `code` # heading",
    "Once upon a time, there was a tokenizer that split words.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "Can you summarise this paragraph for me, please?",
    "'s 't 're 've 'm 'll 'd",
    "''quoted'' and ''' triple",
]

_NUMBERS = [
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159",
    "1,000,000",
    "-273.15",
    "1e-9",
    "0x1F 0b1010 0o777",
    "v2.0.1",
    "2024-01-15",
    "12:30:45",
    "+1 (555) 123-4567",
    "$19.99 and €5,50 and £3",
    "50% off",
    "1st 2nd 3rd 4th",
    "abc123def",
    "x1 y22 z333",
    "room 101",
    "In 1969, 3 astronauts flew 384400 km.",
    "Pi is approximately 3.14, e is 2.718.",
    " 1 2 3 4 5",
    "1+1=2",
    "10/3 = 3.333...",
    "٣٤٥ (Arabic-Indic digits)",
    "१२३ (Devanagari digits)",
    "½ ¾ ² ³ ① ② Ⅻ",
    "version 1.2.3-beta.4",
    "ISBN 978-3-16-148410-0",
    "42\n43\n44",
    "  99  ",
    "x  12 and y   345",
    "\t\t42",
    "total:    1000",
    "007",
]

_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i)",
    "if (x != 0 && y >= 1) { return x / y; }",
    "int main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM users WHERE id = 7 AND name LIKE '%bob%';",
    "#!/bin/bash\nset -euo pipefail\necho \"$HOME\" | grep -v foo > /dev/null 2>&1",
    "x = [i**2 for i in range(5) if i % 2 == 0]",
    "<div class=\"box\"><p>Hello</p></div>",
    "const f = (a, b) => a ?? b;",
    "a<<=2; b>>>=3; c^=~d; e|=f&g;",
    "// comment\n/* block\n   comment */",
    "lambda x: x @ W.T + b",
    "    indented(code)\n        more_indented()",
    "name: graphcap\nversion: 0.1.0\n",
    "std::vector<int> v{1, 2, 3};",
    "regex = r\"\\s+(?!\\S)\"",
]

_UNICODE = [
    "café naïve résumé façade",
    "Ångström Øresund Ærø",
    "Straße größer Fußgänger",
    "señor niño jalapeño",
    "crème brûlée à la carte",
    "Dvořák Łódź Şişli",
    "Ελληνικά γράμματα",
    "Русский текст здесь",
    "中文分词测试",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "العربية نص",
    "עברית טקסט",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "emoji 🙂 😀 🎉",
    "👍🏽 skin tone",
    "family 👨‍👩‍👧‍👦 zwj",
    "flags 🇫🇷 🇯🇵",
    "math ∑ ∫ √ ∞ ≠ ≤ ≥",
    "arrows → ← ↑ ↓ ⇒",
    "box ─│┌┐└┘",
    "currency ¥ ₹ ₽ ₿",
    "combining e\u0301 a\u0308",
    "zero\u200bwidth",
    "no\u00a0break space",
    "ideographic\u3000space",
    "\ufeffBOM first",
    "mixed 中文 and English and 日本語",
    "Ǆ ǅ ǆ titlecase",
    "ſ long s and K kelvin sign",
]

_SPECIAL = [
    "<|im_start|>user\nhi<|im_end|>",
    (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "<|im_start|><|im_end|>",
    "<|im_end|>\n",
    " <|im_start|> spaced <|im_end|> ",
    "<repo_name>graphcap<file_sep>main.py",
    "<filename>a.py\n<gh_stars>100",
    "<jupyter_start><jupyter_code>print(1)<jupyter_output>1",
    "<|im_start",
    "im_start|>",
    "<|im_start|",
    "<<|im_start|>>",
    "<|IM_START|>",
    "<empty_output>",
]

_EDGE = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\n\n",
    " \n ",
    "'",
    "''",
    "'s",
    "a",
    "?",
    ".",
    "...",
    "\x00",
    "\x7f",
    "\x1b[31mred\x1b[0m",
    "\u2028line separator",
    "\ufffd",
    "\U0001f600",
    "a" * 300,
    " " * 50,
    "ab" * 100,
]


def _corpus() -> list[str]:
    base = _PROSE + _NUMBERS + _CODE + _UNICODE + _SPECIAL + _EDGE
    # the same texts where they meet other text: after a space, before a newline
    framed = [f" {s}" for s in _PROSE + _NUMBERS[:20] + _UNICODE[:10]] + [
        f"{s}\n" for s in _CODE[:8] + _NUMBERS[20:]
    ]
    corpus = list(dict.fromkeys(base + framed))
    assert len(corpus) >= 200
    return corpus


CORPUS = _corpus()


def _has_digit(text: str) -> bool:
    """A character of Unicode category N*: what both `\\p{N}` and the Digits pre-tokenizer split off."""
    return any(unicodedata.category(c).startswith("N") for c in text)


@pytest.fixture(scope="module")
def metadata(smollm2_gguf: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(metadata: dict):
    return build_tokenizer(metadata)


@pytest.fixture(scope="module")
def hf_backend(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer.backend_tokenizer


@pytest.fixture(scope="module")
def hf_smollm(hf_backend):
    """HF's GGUF tokenizer with its pre-tokenizer replaced by what "smollm" means (see the module
    docstring); a copy, so the session's tokenizer is left as loaded."""
    from tokenizers import Tokenizer, pre_tokenizers

    patched = Tokenizer.from_str(hf_backend.to_str())
    patched.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return patched


def test_file_is_smollm_byte_level_bpe(metadata):
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_matches_hf_with_smollm_pre_tokenizer(ours, hf_smollm, add_special_tokens):
    mismatches = {
        s: (ours.encode(s, add_special_tokens=add_special_tokens).ids,
            hf_smollm.encode(s, add_special_tokens=add_special_tokens).ids)
        for s in CORPUS
    }
    mismatches = {s: pair for s, pair in mismatches.items() if pair[0] != pair[1]}
    assert not mismatches


def test_matches_unpatched_hf_without_digits(ours, hf_smollm2_tokenizer):
    no_digits = [s for s in CORPUS if not _has_digit(s)]
    assert len(no_digits) >= 120
    mismatches = {s: (ours.encode(s).ids, hf_smollm2_tokenizer.encode(s)) for s in no_digits}
    mismatches = {s: pair for s, pair in mismatches.items() if pair[0] != pair[1]}
    assert not mismatches


def test_unpatched_hf_differs_only_next_to_digits(ours, hf_smollm2_tokenizer):
    """The patch matters: the vocabulary has no multi-digit tokens, so a digit run is cut the same either
    way, but the spaces before it are not. GPT-2's regex takes the space next to a number into the
    number's word (" 99" -> "Ġ", "9", "9"); "smollm" splits the digits off first, leaving the whole
    run of spaces one word ("ĠĠ")."""
    differ = [s for s in CORPUS if ours.encode(s).ids != hf_smollm2_tokenizer.encode(s)]
    assert "  99  " in differ
    assert [ours.id_to_token(i) for i in ours.encode("  99  ").ids] == ["ĠĠ", "9", "9", "ĠĠ"]
    assert all(_has_digit(s) for s in differ)


def test_decode_round_trips(ours):
    failures = {}
    for s in CORPUS:
        decoded = ours.decode(ours.encode(s).ids, skip_special_tokens=False)
        if decoded != s:
            failures[s] = decoded
    assert not failures


def test_special_tokens(ours, metadata, hf_smollm2_tokenizer):
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    control = [t for t, kind in zip(tokens, types) if kind == 3]
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(control)
    for token in control:
        token_id = tokens.index(token)
        assert ours.token_to_id(token) == token_id
        assert ours.encode(token).ids == [token_id]
        assert hf_smollm2_tokenizer.convert_tokens_to_ids(token) == token_id
    assert (ours.token_to_id("<|im_start|>"), ours.token_to_id("<|im_end|>")) == (1, 2)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_no_bos_because_the_file_says_so(ours, metadata):
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    assert ours.encode("hi", add_special_tokens=True).ids == ours.encode("hi", add_special_tokens=False).ids
    assert ours.encode("", add_special_tokens=True).ids == []


def test_vocabulary_size(ours, hf_backend, metadata):
    assert ours.get_vocab_size() == hf_backend.get_vocab_size() == len(metadata["tokenizer.ggml.tokens"])
