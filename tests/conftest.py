"""Shared fixtures: tiny random HF checkpoints written with `transformers`, so every model test compares
graphcap against the reference implementation on weights neither side chose.

Weights are re-drawn after HF's init with a large std: HF's default (0.02) makes a tiny random model emit
the same token forever, and then "tokens equal HF's" would prove nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI draws the same examples every run (a red CI must mean a change broke something, not a new draw);
# local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tests start engines cold: a graph restored from the user's cache (or from another test) would skip the
# capture, verification and timing they are about. tests/graph/test_graph_cache.py turns the cache on.
os.environ["GRAPHCAP_GRAPH_CACHE"] = "0"

VOCAB = 256
MAX_POS = 256
BOS, EOS = 1, 2

# Words for the test tokenizer; ids 0-2 are special, the rest of the vocabulary is "w{i}".
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "and", "then", "it", "slept"]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory and the HF class that reads it back (the reference)."""

    name: str
    path: Path
    hf_class: str


def _base(**overrides) -> dict:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6, bos_token_id=BOS,
        eos_token_id=EOS, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


# name -> (HF model class, HF config class, config kwargs)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama_gqa": ("LlamaForCausalLM", "LlamaConfig", _base()),
    "llama_tied": ("LlamaForCausalLM", "LlamaConfig", _base(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama_bias": ("LlamaForCausalLM", "LlamaConfig", _base(attention_bias=True, mlp_bias=True)),
    "llama3_rope": (
        "LlamaForCausalLM", "LlamaConfig",
        # original context 32 puts head_dim-16 frequencies in all three llama3 regimes (low/medium/high)
        _base(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                               "rope_theta": 10000.0}),
    ),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _base()),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", _base(head_dim=32)),  # 4 heads x 32 != hidden 64
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Large random weights so greedy decoding varies; norms near 1, biases clearly non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.75 + 0.5 * torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def build_hf(name: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    model_cls, cfg_cls, kwargs = CONFIGS[name]
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    randomize_(model, seed)
    return model


def save_checkpoint(name: str, path: Path, seed: int = 0, **save_kwargs) -> Path:
    model = build_hf(name, seed)
    model.save_pretrained(str(path), safe_serialization=True, **save_kwargs)
    return path


def load_hf(ckpt: Checkpoint) -> torch.nn.Module:
    import transformers

    model = getattr(transformers, ckpt.hf_class).from_pretrained(
        str(ckpt.path), torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


_CACHE: dict[str, Checkpoint] = {}


def get_checkpoint(root: Path, name: str) -> Checkpoint:
    """Write each named checkpoint once per session."""
    if name not in _CACHE:
        path = save_checkpoint(name, root / name)
        _CACHE[name] = Checkpoint(name, path, CONFIGS[name][0])
    return _CACHE[name]


@pytest.fixture(scope="session")
def checkpoint(ckpt_root):
    """Factory: the session's checkpoint for a CONFIGS name."""
    return lambda name: get_checkpoint(ckpt_root, name)


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def any_checkpoint(request, ckpt_root) -> Checkpoint:
    """Every model configuration in turn."""
    return get_checkpoint(ckpt_root, request.param)


@pytest.fixture(scope="session")
def llama_ckpt(ckpt_root) -> Checkpoint:
    return get_checkpoint(ckpt_root, "llama_gqa")


@pytest.fixture(scope="session")
def sharded_ckpt(ckpt_root, llama_ckpt) -> Checkpoint:
    """The llama_gqa weights saved in several shards with a model.safetensors.index.json."""
    hf = load_hf(llama_ckpt)
    path = ckpt_root / "llama_sharded"
    hf.save_pretrained(str(path), safe_serialization=True, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    return Checkpoint("llama_sharded", path, llama_ckpt.hf_class)


def build_tokenizer_json(path: Path) -> Path:
    """A WordLevel tokenizer over WORDS + w{i}, with BOS added in front (as Llama's tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS}
    for w in WORDS:
        vocab[w] = len(vocab)
    while len(vocab) < VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenized_ckpt(ckpt_root, llama_ckpt) -> Checkpoint:
    """llama_gqa plus a tokenizer.json, so text prompts work."""
    path = ckpt_root / "llama_tok"
    shutil.copytree(llama_ckpt.path, path)
    build_tokenizer_json(path / "tokenizer.json")
    return Checkpoint("llama_tok", path, llama_ckpt.hf_class)


@pytest.fixture(scope="session")
def nobos_ckpt(ckpt_root, tokenized_ckpt) -> Checkpoint:
    """llama_tok whose tokenizer adds no BOS, so the empty string encodes to no tokens at all."""
    from tokenizers import Tokenizer

    path = ckpt_root / "llama_nobos"
    shutil.copytree(tokenized_ckpt.path, path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = None
    tok.save(str(path / "tokenizer.json"))
    return Checkpoint("llama_nobos", path, tokenized_ckpt.hf_class)


@pytest.fixture()
def ckpt_copy(tmp_path, llama_ckpt) -> Path:
    """A private, writable copy of llama_gqa for tests that damage or edit a checkpoint."""
    path = tmp_path / "ckpt"
    shutil.copytree(llama_ckpt.path, path)
    return path


def edit_config(path: Path, **changes) -> None:
    """Rewrite fields of a checkpoint's config.json (a value of None deletes the field)."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_file.write_text(json.dumps(cfg))


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 20) -> list[list[int]]:
    """n random prompts of different lengths over the non-special ids."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=gen).tolist()
    return [torch.randint(3, VOCAB, (length,), generator=gen).tolist() for length in lengths]


@pytest.fixture(scope="session")
def kit():
    """The helpers above, reachable from test modules without importing `conftest` by name (another
    directory's conftest.py could shadow that module name)."""
    import types

    return types.SimpleNamespace(
        VOCAB=VOCAB, MAX_POS=MAX_POS, BOS=BOS, EOS=EOS, WORDS=WORDS, CONFIGS=CONFIGS, prompts=prompts,
        edit_config=edit_config, load_hf=load_hf, build_hf=build_hf, save_checkpoint=save_checkpoint,
        build_tokenizer_json=build_tokenizer_json, randomize=randomize_,
    )


def pytest_collection_modifyitems(config, items) -> None:
    """CUDA tests (`-m cuda`) skip themselves cleanly on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
