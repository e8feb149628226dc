"""Encoder graph runner: the whole embedding forward (encoder + pooling), one graph per (batch, seq) bucket.

Text encoders (BERT) take `[batch, seq]` ids and a 0/1 attention mask, so a live batch is padded up to the
smallest bucket that holds it: extra sequence positions get mask 0 (no token attends to them and pooling
skips them), extra rows are dummy sequences of one token (mask 1 at position 0 only, so no row ever attends
over nothing) whose outputs are sliced away. Image encoders (ViT) have a fixed token count, so their buckets
differ in batch size only.

Every bucket is verified at capture against eager on fresh random inputs (random lengths, so padding inside
the bucket is exercised, and a batch one row short, so dummy rows are too) and, with `select="auto"`, timed
against eager; a bucket serves graphs only where it is both right and faster. Verification compares with eager
on the *unpadded* batch, which is what the eager path of the engine runs, so a padding bug cannot hide.

Capture context: a tensor-parallel encoder issues all-reduces inside the graph, so capture must enter the TP
group's communicator capture (every rank captures the same buckets in the same order, and the ranks agree on
each bucket's verdict, so none replays a graph while another runs the bucket eagerly). A data-parallel encoder
runs the whole model on each rank's own inputs and issues no collective; entering the group's capture there
would make every rank wait for the others at a collective capture step they may never reach with the same
shapes, so it captures in a plain context. `encoder_capture_context` is that choice, in one place.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from graphcap.distributed.parallel_state import get_tp_group
from graphcap.errors import UserError
from graphcap.graph.backends import make_backend
from graphcap.graph.backends.base import Replay
from graphcap.graph.config import EncoderGraphConfig
from graphcap.graph.runners.base import BucketedGraphRunner

Bucket = tuple[int, int]  # (batch size, sequence length)


def _tensor_parallel(parallel: str) -> bool:
    group = get_tp_group()
    return parallel == "tp" and group is not None and group.world_size > 1


def encoder_capture_context(parallel: str):
    """The context an encoder captures in: the TP group's `graph_capture()` (which enters every
    communicator's capture) when the encoder is sharded over more than one rank, else a null context."""
    if _tensor_parallel(parallel):
        return get_tp_group().graph_capture()
    return contextlib.nullcontext()


def encoder_replay_context(parallel: str):
    """The context replays run in: the TP group's `graph_replay()` where it has one (CPU graphs call the
    collectives again at replay and must take the path they were captured with), else a null context."""
    if _tensor_parallel(parallel):
        replay = getattr(get_tp_group(), "graph_replay", None)
        if replay is not None:
            return replay()
    return contextlib.nullcontext()


def bucket_label(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


class EncoderProbes:
    """Capture/verification inputs for an encoder: random batches from the runner, nothing to give back."""

    def __init__(self, runner: "EncoderGraphRunner") -> None:
        self.runner = runner

    def batch(self, batch: int, seq: int, full: bool) -> tuple[torch.Tensor, ...]:
        return self.runner.random_inputs(batch, seq, full)

    def release(self) -> None:
        """Encoder probes hold no cache pages."""


class EncoderGraphRunner(BucketedGraphRunner):
    """Buckets, static buffers and padding for one encoder model; capture, verification, selection and
    counters come from `BucketedGraphRunner`, with (batch, sequence length) buckets.

    `model` is a graphcap encoder (`BertModel` or `ViTModel`): the runner graphs `model.embed`. `max_seq_len`
    caps the text sequence buckets (the tokenizer's truncation length or the position table).
    """

    phase = "encoder"
    timing_iters = 7

    def __init__(self, model: torch.nn.Module, cfg: EncoderGraphConfig, device: torch.device,
                 max_seq_len: int | None = None) -> None:
        self.model = model
        self.cfg = cfg
        mc = model.config
        self.is_image = hasattr(mc, "image_size")
        self.batch_sizes = sorted(set(cfg.batch_sizes))
        if self.is_image:
            self.seq_lens = [mc.num_patches + 1]
            self.image_shape = (mc.num_channels, mc.image_size, mc.image_size)
        else:
            limit = min(max_seq_len or mc.max_position_embeddings, mc.max_position_embeddings)
            self.seq_lens = sorted({s for s in cfg.seq_lens if s <= limit})
            if not self.seq_lens:
                raise UserError(f"no encoder sequence length in {list(cfg.seq_lens)} fits the model's {limit} tokens")
        buckets: list[Bucket] = [(b, s) for b in self.batch_sizes for s in self.seq_lens]
        super().__init__(torch.device(device), cfg.mode, buckets, cfg.verify, cfg.select, cfg.atol, cfg.rtol)
        self.max_bs = self.batch_sizes[-1]
        self.max_seq = self.seq_lens[-1]
        self.dtype = next(model.parameters()).dtype
        # Per-bucket contiguous buffers for text (a [:b, :s] view of one big buffer would not be contiguous);
        # one pixel buffer for images, whose [:b] views are.
        self.static: dict[Bucket, tuple[torch.Tensor, ...]] = {}
        if self.is_image:
            self.pixels = torch.zeros(self.max_bs, *self.image_shape, dtype=self.dtype, device=self.device)
        self.backend = make_backend(cfg.mode, self.device, dict(cfg.inductor_options))
        self.replays: dict[Bucket, Replay] = {}
        self.step_fn = self._step_fn()
        self.gen = torch.Generator().manual_seed(1234)

    # -- runner protocol ------------------------------------------------------------------------------
    def bucket_for(self, batch_size: int, seq_len: int) -> Bucket | None:
        if batch_size > self.max_bs or seq_len > self.max_seq:
            return None
        return (next(b for b in self.batch_sizes if b >= batch_size), next(s for s in self.seq_lens if s >= seq_len))

    def can_run(self, batch_size: int, seq_len: int) -> str | None:  # type: ignore[override]
        """None if the batch can replay a graph, else the reason it runs eagerly."""
        if batch_size > self.max_bs:
            return "batch_too_large"
        if seq_len > self.max_seq:
            return "seq_too_long"
        report = self._stats.buckets.get(self.bucket_for(batch_size, seq_len))
        if report is None:
            return "not_captured"
        if report.status != "graph":
            return report.reason
        return None

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Embeddings [B, H] of a batch `can_run` accepted: (input_ids, attention_mask) or (pixel_values,)."""
        self._stats.replays += 1
        with encoder_replay_context(self.cfg.parallel):
            return self._replay(inputs).clone()

    def stats(self) -> dict:
        out = self._stats.as_dict()
        buckets = sorted(self._stats.buckets.items())
        out["captured"] = [bucket_label(k) for k, rep in buckets if rep.status == "graph"]
        out["buckets"] = {bucket_label(k): rep.as_dict() for k, rep in buckets}
        out["parallel"] = self.cfg.parallel
        return out

    # -- mechanics ------------------------------------------------------------------------------------
    def _args(self, bucket: Bucket) -> tuple[torch.Tensor, ...]:
        if self.is_image:
            return (self.pixels[: bucket[0]],)
        if bucket not in self.static:
            b, s = bucket
            self.static[bucket] = (torch.zeros(b, s, dtype=torch.long, device=self.device),
                                   torch.zeros(b, s, dtype=torch.long, device=self.device))
        return self.static[bucket]

    def _step_fn(self) -> Callable[..., torch.Tensor]:
        model = self.model

        def encoder_step(*inputs):
            return model.embed(*inputs)

        return encoder_step

    def _fill(self, inputs: tuple[torch.Tensor, ...], bucket: Bucket) -> tuple[torch.Tensor, ...]:
        args = self._args(bucket)
        if self.is_image:
            (pixels,) = inputs
            n = pixels.shape[0]
            args[0][:n].copy_(pixels)
            args[0][n:].zero_()
            return args
        ids, mask = inputs
        n, s = ids.shape
        sids, smask = args
        sids.zero_()
        smask.zero_()
        sids[:n, :s].copy_(ids)
        smask[:n, :s].copy_(mask)
        smask[n:, 0] = 1  # dummy rows: one token each, so no row attends over no keys
        return args

    def _replay(self, inputs: tuple[torch.Tensor, ...], bucket: Bucket | None = None) -> torch.Tensor:
        n = inputs[0].shape[0]
        seq = self.seq_lens[0] if self.is_image else inputs[0].shape[1]
        bucket = bucket or self.bucket_for(n, seq)
        return self.replays[bucket](self._fill(inputs, bucket))[:n]

    def random_inputs(self, batch: int, seq: int, full: bool) -> tuple[torch.Tensor, ...]:
        """A random batch for verification/timing: `full` gives every row `seq` tokens; otherwise lengths are
        random in [1, seq] and the batch is cut to its longest row, as the tokenizer pads it."""
        if self.is_image:
            return (torch.randn(batch, *self.image_shape, generator=self.gen).to(self.device, self.dtype),)
        vocab = self.model.config.vocab_size
        if full:
            lengths = torch.full((batch,), seq)
        else:
            lengths = torch.randint(1, seq + 1, (batch,), generator=self.gen)
        width = int(lengths.max())
        ids = torch.randint(0, vocab, (batch, width), generator=self.gen)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        return ids.to(self.device), mask.to(self.device)

    # -- capture hooks (BucketedGraphRunner) ----------------------------------------------------------
    def _probes(self) -> EncoderProbes:  # type: ignore[override]
        return EncoderProbes(self)

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:  # type: ignore[override]
        return self.model.embed(*inputs)

    def _capture_context(self):
        return encoder_capture_context(self.cfg.parallel)

    def _capture_order(self) -> list[Bucket]:
        return sorted(self.buckets, key=lambda k: (k[0] * k[1], k), reverse=True)  # largest first (CUDA pool)

    def _label(self, bucket: Bucket) -> str:
        return bucket_label(bucket)

    def _capture_bucket(self, bucket: Bucket, probes: EncoderProbes) -> None:  # type: ignore[override]
        args = self._fill(probes.batch(*bucket, full=True), bucket)
        self.replays[bucket] = self.backend.capture(self.step_fn, args, f"encoder {bucket_label(bucket)}")

    def _verify_batches(self, bucket: Bucket, probes: EncoderProbes) -> list:  # type: ignore[override]
        """A full bucket, and one row short with random lengths (padding inside the bucket and dummy rows)."""
        bs, seq = bucket
        return [probes.batch(bs, seq, full=True), probes.batch(max(1, bs - 1), seq, full=False)]

    def _timing_batches(self, bucket: Bucket, probes: EncoderProbes) -> list:  # type: ignore[override]
        return [probes.batch(*bucket, full=True)]
