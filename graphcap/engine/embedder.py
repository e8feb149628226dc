"""The encoder engine behind `LLM.embed`: tokenise, batch by bucket, run a graph or eager, pool, return lists.

`LLM(model=...)` builds an `Embedder` instead of the decoder engine when the checkpoint is an encoder
(`is_encoder_checkpoint`). Texts are tokenised one by one (no padding), sorted by length and cut into
chunks whose rows share one sequence bucket, at most the largest batch bucket per chunk, so padding stays
small; each chunk is padded to its longest row and runs on its bucket's graph when the runner accepts it,
eagerly otherwise (counted with the runner's reason). Results come back in the caller's order.

Parallel modes: "tp" shards the encoder over the installed TP group (the decoder's layout); "dp" runs the
whole encoder on every rank on that rank's own inputs, so while it builds or runs the TP group is detached
(the layers then neither shard nor all-reduce). With tp_size > 1 and no TP group in the process, `LLM` starts
ranks of its own and builds one Embedder in each (`graphcap.engine.tp_embedder`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graphcap.config import EngineConfig
from graphcap.distributed.parallel_state import get_tp_group, set_tp_group
from graphcap.errors import UserError
from graphcap.executor.encoder_loader import (
    MINILM_NAMES,
    build_encoder,
    encoder_path,
    load_tokenizer,
    resolve_encoder_source,
)
from graphcap.graph.runners.encoder import EncoderGraphRunner
from graphcap.models.config import parse_dtype
from graphcap.models.encoder_registry import ENCODER_ARCHITECTURES

log = logging.getLogger("graphcap")

_ENCODER_MODEL_TYPES = ("bert", "vit")


def is_encoder_checkpoint(model: str) -> bool:
    """True for the MiniLM names and for directories whose config.json names an encoder architecture.
    Anything else (presets, decoder checkpoints, bad paths) is left to the decoder path and its errors."""
    if model in MINILM_NAMES:
        return True
    cfg_file = Path(model).expanduser() / "config.json"
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(hf, dict):
        return False
    archs = hf.get("architectures") or []
    if archs:
        return str(archs[0]) in ENCODER_ARCHITECTURES
    return hf.get("model_type") in _ENCODER_MODEL_TYPES


def require_encoder_checkpoint(model: str) -> None:
    """Raise a UserError unless `model` names an encoder (missing MiniLM package and bad paths included)."""
    encoder_path(model)  # the MiniLM install hint, or "neither minilm nor an existing directory"
    if not is_encoder_checkpoint(model):
        raise UserError(
            f"{model!r} is not an encoder checkpoint (config.json architectures: "
            f"{', '.join(sorted(ENCODER_ARCHITECTURES))}); embed needs one"
        )


@contextlib.contextmanager
def parallel_scope(parallel: str):
    """Detach the TP group while a data-parallel encoder builds or runs; a no-op for "tp"."""
    group = get_tp_group()
    if parallel != "dp" or group is None:
        yield
        return
    set_tp_group(None)
    try:
        yield
    finally:
        set_tp_group(group)


@dataclass(frozen=True)
class EncoderInputs:
    """What an encoder accepts: texts (it has a tokenizer) and/or images of one shape. Kept apart from the
    model so a process that holds none (the API side of a launched TP group) checks a call the same way."""

    model: str
    takes_texts: bool
    image_shape: tuple[int, int, int] | None  # (channels, height, width) of an image encoder


def check_inputs(spec: EncoderInputs, texts=None, images=None) -> tuple[list[str] | None, torch.Tensor | None]:
    """The arguments of `embed`, checked and normalised: (list of strings, None) or (None, a [B, C, H, W]
    floating-point tensor). Raises a UserError for every mistake the caller can make."""
    if (texts is None) == (images is None):
        raise UserError("pass exactly one of texts= or images=")
    if texts is not None:
        return _check_texts(spec, texts), None
    return None, _check_images(spec, images)


def _check_texts(spec: EncoderInputs, texts) -> list[str]:
    if not spec.takes_texts:
        raise UserError(f"{spec.model!r} is an image encoder; pass images= instead of texts=")
    if isinstance(texts, str):
        return [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise UserError(f"texts must be a string or a list of strings, got {type(texts).__name__}") from None
    if not texts:
        raise UserError("no texts to embed")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserError(f"texts must be strings; item {i} is {type(t).__name__}")
    return texts


def _check_images(spec: EncoderInputs, images) -> torch.Tensor:
    if spec.image_shape is None:
        raise UserError(f"{spec.model!r} is a text encoder; pass texts= instead of images=")
    if isinstance(images, torch.Tensor):
        pixels = images
    elif isinstance(images, (list, tuple)) and images and all(isinstance(x, torch.Tensor) for x in images):
        if any(x.dim() != 3 for x in images):
            raise UserError("each image in a list must be a [channels, height, width] tensor")
        if len({tuple(x.shape) for x in images}) != 1:
            raise UserError("images in a list must all have the same shape")
        pixels = torch.stack(list(images))
    else:
        raise UserError("images must be a [batch, channels, height, width] tensor or a list of [c, h, w] tensors")
    expected = spec.image_shape
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
        raise UserError(
            f"images have shape {tuple(pixels.shape)}; the model expects [batch, {', '.join(map(str, expected))}]"
        )
    if pixels.shape[0] == 0:
        raise UserError("no images to embed")
    if not pixels.is_floating_point():
        raise UserError(f"pixel values must be floating point, got {pixels.dtype}")
    return pixels


class Embedder:
    def __init__(self, cfg: EngineConfig) -> None:
        if cfg.graph_decode not in (None, "eager") or cfg.graph_prefill not in (None, "eager"):
            raise UserError(f"{cfg.model!r} is an encoder; set graph_encoder= instead of graph_decode/graph_prefill")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("device='cuda' was requested but no CUDA device is available")
        group = get_tp_group()
        if cfg.tp_size > 1 and (group is None or group.world_size != cfg.tp_size):
            raise UserError(
                f"an encoder with tp_size={cfg.tp_size} built in this process joins its TP group, and none of that "
                "size is initialised (LLM(model, tp_size=N) starts ranks of its own unless a launcher such as "
                "torchrun started this process)"
            )
        self.config = cfg
        self.rank = 0 if group is None else group.rank_in_group
        self.device = torch.device(cfg.device)
        self.dtype = parse_dtype(cfg.dtype)
        self.graph_config = cfg.encoder_graph()
        self.parallel = self.graph_config.parallel
        t0 = time.perf_counter()
        source = resolve_encoder_source(cfg.model)
        with parallel_scope(self.parallel):
            self.model = build_encoder(source, self.dtype, self.device)
        self.is_image = hasattr(self.model.config, "image_size")
        self.max_length = source.max_length
        self.tokenizer = None
        if source.tokenizer_path is not None and source.max_length is not None:
            pad_id = int(source.hf_config.get("pad_token_id") or 0)
            self.tokenizer = load_tokenizer(source.tokenizer_path, source.max_length, pad_id)
            self.tokenizer.no_padding()  # one text at a time; chunks are padded here, to their bucket
        mc = self.model.config
        self.inputs = EncoderInputs(cfg.model, self.tokenizer is not None,
                                    (mc.num_channels, mc.image_size, mc.image_size) if self.is_image else None)
        self.load_seconds = time.perf_counter() - t0
        self.chunk_size = max(self.graph_config.batch_sizes)
        self.runner: EncoderGraphRunner | None = None
        if self.graph_config.mode != "eager":
            self.runner = EncoderGraphRunner(self.model, self.graph_config, self.device, self.max_length)
            with parallel_scope(self.parallel):
                self.runner.capture()
        self._counters = {"inputs": 0, "tokens": 0, "graph_batches": 0, "eager_batches": 0}

    # -- public -----------------------------------------------------------------------------------------
    def embed(self, texts=None, images=None) -> list[list[float]]:
        texts, pixels = check_inputs(self.inputs, texts, images)
        out = self._embed_texts(texts) if texts is not None else self._embed_images(pixels)
        return out.float().cpu().tolist()

    def stats(self) -> dict:
        encoder = self.runner.stats() if self.runner else {"mode": "eager", "replays": 0, "rejects": {},
                                                           "captured": [], "parallel": self.parallel}
        encoder.update(self._counters)
        return {"encoder": encoder, "load_seconds": round(self.load_seconds, 3)}

    def shutdown(self) -> None:
        """Nothing to release: the model lives in this process. Here so `LLM` shuts every embedder down alike."""

    # -- texts ------------------------------------------------------------------------------------------
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        encodings = [(e.ids, e.attention_mask) for e in self.tokenizer.encode_batch(texts)]
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i][0]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for chunk in self._chunks(order, [len(encodings[i][0]) for i in order]):
            width = max(len(encodings[i][0]) for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                e_ids, e_mask = encodings[i]
                ids[row, : len(e_ids)] = torch.tensor(e_ids)
                mask[row, : len(e_mask)] = torch.tensor(e_mask)
            emb = self._run(len(chunk), width, ids.to(self.device), mask.to(self.device))
            self._counters["tokens"] += int(mask.sum())
            for row, i in enumerate(chunk):
                out[i] = emb[row]
        self._counters["inputs"] += len(texts)
        return torch.stack(out)  # type: ignore[arg-type]

    def _chunks(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """Consecutive runs of the length-sorted inputs that share a sequence bucket, at most `chunk_size` long."""
        chunks: list[list[int]] = []
        key = None
        for i, length in zip(order, lengths):
            k = self._seq_key(length)
            if chunks and k == key and len(chunks[-1]) < self.chunk_size:
                chunks[-1].append(i)
            else:
                chunks.append([i])
                key = k
        return chunks

    def _seq_key(self, length: int) -> int:
        seqs = self.runner.seq_lens if self.runner else self.graph_config.seq_lens
        return next((s for s in sorted(seqs) if s >= length), -1)  # -1: beyond every bucket

    # -- images -----------------------------------------------------------------------------------------
    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        tokens = self.model.config.num_patches + 1
        parts = [self._run(len(c), tokens, c) for c in pixels.split(self.chunk_size)]
        self._counters["inputs"] += pixels.shape[0]
        self._counters["tokens"] += pixels.shape[0] * tokens
        return torch.cat(parts)

    # -- one chunk ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, batch: int, seq: int, *inputs: torch.Tensor) -> torch.Tensor:
        with parallel_scope(self.parallel):
            if self.runner is not None:
                reason = self.runner.can_run(batch, seq)
                if reason is None:
                    self._counters["graph_batches"] += 1
                    return self.runner.run(*inputs)
                self.runner.count_reject(reason)
            self._counters["eager_batches"] += 1
            return self.model.embed(*inputs)
