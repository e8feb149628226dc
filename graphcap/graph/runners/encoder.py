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
import logging
import time
from typing import Callable

import torch
from tqdm import tqdm

from graphcap.distributed.parallel_state import get_tp_group
from graphcap.errors import UserError
from graphcap.graph.backends import make_backend
from graphcap.graph.backends.base import Replay
from graphcap.graph.config import EncoderGraphConfig
from graphcap.graph.probe import rss_bytes
from graphcap.graph.runners.base import agree_across_ranks
from graphcap.graph.stats import BucketReport, RunnerStats
from graphcap.graph.verify import compare, interleaved_medians

log = logging.getLogger("graphcap")

TIMING_ITERS = 7
VERIFY_TRIALS = 2

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


class EncoderGraphRunner:
    """Buckets, static buffers, padding, verification and counters for one encoder model.

    `model` is a graphcap encoder (`BertModel` or `ViTModel`): the runner graphs `model.embed`. `max_seq_len`
    caps the text sequence buckets (the tokenizer's truncation length or the position table).
    """

    def __init__(self, model: torch.nn.Module, cfg: EncoderGraphConfig, device: torch.device,
                 max_seq_len: int | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.device = torch.device(device)
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
        self.buckets: list[Bucket] = [(b, s) for b in self.batch_sizes for s in self.seq_lens]
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
        self._stats = RunnerStats(mode=cfg.mode)
        self.gen = torch.Generator().manual_seed(1234)

    # -- runner protocol ------------------------------------------------------------------------------
    def bucket_for(self, batch_size: int, seq_len: int) -> Bucket | None:
        if batch_size > self.max_bs or seq_len > self.max_seq:
            return None
        return (next(b for b in self.batch_sizes if b >= batch_size), next(s for s in self.seq_lens if s >= seq_len))

    def can_run(self, batch_size: int, seq_len: int) -> str | None:
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

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, H] of a batch `can_run` accepted: (input_ids, attention_mask) or (pixel_values,)."""
        self._stats.replays += 1
        with encoder_replay_context(self.cfg.parallel):
            return self._replay(inputs).clone()

    def count_reject(self, reason: str) -> None:
        self._stats.reject(reason)

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

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.model.embed(*inputs)

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

    # -- capture --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        rss0 = rss_bytes()
        step = self._step_fn()
        order = sorted(self.buckets, key=lambda k: (k[0] * k[1], k), reverse=True)  # largest first (CUDA pool)
        with encoder_capture_context(self.cfg.parallel):
            bar = tqdm(order, desc=f"capture encoder ({self.cfg.mode})", unit="bucket", disable=None, leave=False)
            for bucket in bar:
                bar.set_postfix(bucket=bucket_label(bucket))
                report = self._stats.buckets[bucket] = BucketReport(bucket)  # type: ignore[arg-type]
                args = self._fill(self.random_inputs(*bucket, full=True), bucket)
                try:
                    self.replays[bucket] = self.backend.capture(step, args, f"encoder {bucket_label(bucket)}")
                except Exception as e:  # a backend that cannot capture this bucket falls back, with the reason kept
                    if self.cfg.verify == "strict":
                        raise
                    report.status, report.reason = "rejected", "capture_failed"
                    log.warning("encoder bucket %s: capture failed (%s: %s); it runs eagerly",
                                bucket_label(bucket), type(e).__name__, e)
                else:
                    self._verify_and_select(bucket, report)
                agree_across_ranks(report)
        self._stats.capture_seconds = time.perf_counter() - t0
        self._stats.graph_memory_bytes = self.backend.memory_bytes() or max(0, rss_bytes() - rss0)
        self._log_summary()

    def _verify_and_select(self, bucket: Bucket, report: BucketReport) -> None:
        bs, seq = bucket
        worst = 0.0
        if self.cfg.verify != "off":
            for trial in range(VERIFY_TRIALS):
                live = bs if trial == 0 else max(1, bs - 1)
                inputs = self.random_inputs(live, seq, full=trial == 0)
                diff, ok = compare(self._replay(inputs, bucket), self._eager(inputs), self.cfg.atol, self.cfg.rtol)
                worst = max(worst, diff)
                if not ok:
                    report.status, report.reason, report.max_abs_diff = "rejected", "bucket_rejected", diff
                    msg = f"encoder bucket {bucket_label(bucket)}: graph differs from eager (max |diff| {diff:.3g})"
                    if self.cfg.verify == "strict":
                        raise RuntimeError(msg)
                    log.warning("%s; the bucket runs eagerly", msg)
                    return
        report.max_abs_diff = worst
        if self.cfg.select == "auto":
            inputs = self.random_inputs(bs, seq, full=True)
            report.graph_ms, report.eager_ms = interleaved_medians(
                lambda: self._replay(inputs, bucket), lambda: self._eager(inputs), TIMING_ITERS
            )
            if report.graph_ms >= report.eager_ms:
                report.status, report.reason = "eager", "bucket_slower_than_eager"
                return
        report.status = "graph"

    def _log_summary(self) -> None:
        s = self._stats
        by_status: dict[str, list[str]] = {}
        for bucket, rep in sorted(s.buckets.items()):
            by_status.setdefault(rep.status, []).append(bucket_label(bucket))
        parts = ", ".join(f"{k}={v}" for k, v in sorted(by_status.items()))
        log.info(
            "encoder graphs (%s, %s): %d buckets [%s] in %.1f s, memory +%.1f MiB",
            self.cfg.mode, self.cfg.parallel, len(s.buckets), parts, s.capture_seconds,
            s.graph_memory_bytes / 2**20,
        )
