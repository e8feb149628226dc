"""Decode graph runner: the whole decode step, one graph per batch-size bucket.

The runner owns shapes: it pads a live batch to the smallest bucket that holds it, fills static input
and attention-metadata buffers, replays the bucket's graph and slices the logits back. The backend only
knows how to capture and replay. At capture every bucket is verified against eager on fresh random
inputs and (with `select="auto"`) timed against eager, so a graph is served only where it is both right
and faster.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from tqdm import tqdm

from graphcap.attention.metadata import StaticMetadataBuffers, decode_metadata
from graphcap.distributed.parallel_state import graph_capture, graph_replay
from graphcap.errors import UserError
from graphcap.executor.forward_batch import ForwardBatch, ForwardMode
from graphcap.graph.backends import make_backend
from graphcap.graph.backends.base import Replay
from graphcap.graph.config import DecodeGraphConfig
from graphcap.graph.probe import ProbeBatches, rss_bytes
from graphcap.graph.stats import BucketReport, RunnerStats
from graphcap.graph.verify import compare, faster, interleaved_timings

log = logging.getLogger("graphcap")

TIMING_ITERS = 15
VERIFY_TRIALS = 2


class DecodeGraphRunner:
    def __init__(
        self, model_runner, cfg: DecodeGraphConfig, max_running_requests: int, max_model_len: int, compiler=None
    ) -> None:
        self.mr = model_runner
        self.cfg = cfg
        self.device = model_runner.device
        self.page_size = model_runner.page_size
        self.buckets = cfg.buckets(max_running_requests)
        if not self.buckets:
            raise UserError(f"no decode size in {list(cfg.sizes)} fits max_running_requests={max_running_requests}")
        self.max_bs = self.buckets[-1]
        self.max_cols = -(-max_model_len // self.page_size)
        self.static_cols = self.device.type == "cuda"  # CUDA graphs fix every shape; Inductor allows one dynamic dim
        attention = cfg.attention
        if attention == "auto":
            # piecewise splits the graph at the opaque op; CUDA graphs of the whole step need it too
            attention = "opaque" if self.device.type == "cuda" or cfg.mode == "piecewise" else "inline"
        self.inline_attention = attention == "inline"
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self.meta = StaticMetadataBuffers(self.max_bs, self.max_cols, self.page_size, self.device)
        self.backend = make_backend(cfg.mode, self.device, dict(cfg.inductor_options), compiler)
        self.replays: dict[int, Replay] = {}
        self._stats = RunnerStats(mode=cfg.mode)

    # -- runner protocol ------------------------------------------------------------------------------
    def can_run(self, batch: ForwardBatch) -> str | None:
        if batch.mode == ForwardMode.TARGET_VERIFY:
            return "target_verify"
        if batch.mode != ForwardMode.DECODE:
            return "not_decode"
        if batch.batch_size > self.max_bs:
            return "batch_too_large"
        if batch.attn.block_table.shape[1] > self.max_cols:
            return "context_too_long"
        report = self._stats.buckets[self._bucket_for(batch.batch_size)]
        if report.status != "graph":
            return report.reason
        return None

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        self._stats.replays += 1
        return self._replay(batch)

    def count_reject(self, reason: str) -> None:
        self._stats.reject(reason)

    def stats(self) -> dict:
        return self._stats.as_dict()

    # -- mechanics ------------------------------------------------------------------------------------
    def _bucket_for(self, bs: int) -> int:
        return next(b for b in self.buckets if b >= bs)

    def _cols_for(self, live_cols: int) -> int:
        # Dynamo specialises sizes 0 and 1, so a dynamic dimension is never allowed to shrink below 2.
        return self.max_cols if self.static_cols else min(self.max_cols, max(2, live_cols))

    def _args(self, bs: int, cols: int) -> tuple[torch.Tensor, ...]:
        return (self.input_ids[:bs], self.positions[:bs], *self.meta.args(bs, cols))

    def _step_fn(self):
        model = self.mr.model
        page_size = self.page_size
        inline = self.inline_attention

        def decode_step(input_ids, positions, slot_mapping, block_table, q_pos):
            meta = decode_metadata(slot_mapping, block_table, q_pos, page_size, inline)
            return model(input_ids, positions, meta)

        return decode_step

    def _replay(self, batch: ForwardBatch, bucket: int | None = None) -> torch.Tensor:
        bs = batch.batch_size
        bucket = bucket or self._bucket_for(bs)
        cols = self._cols_for(batch.attn.block_table.shape[1])
        self.input_ids[:bs].copy_(batch.input_ids)
        self.input_ids[bs:bucket].zero_()
        self.positions[:bs].copy_(batch.positions)
        self.positions[bs:bucket].zero_()
        self.meta.load(batch.attn, bucket, cols)
        with graph_replay():
            return self.replays[bucket](self._args(bucket, cols))[:bs]

    # -- capture --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        rss0 = rss_bytes()
        probes = ProbeBatches(self.mr, seed=1234)
        step = self._step_fn()
        capture_cols = self._cols_for(4)
        dynamic = () if self.static_cols else ((3, 1),)
        with graph_capture():
            bar = tqdm(sorted(self.buckets, reverse=True), desc=f"capture decode ({self.cfg.mode})", unit="bucket",
                       disable=None, leave=False)
            for bs in bar:
                bar.set_postfix(bs=bs)
                report = self._stats.buckets[bs] = BucketReport(bs)
                self.input_ids.zero_()
                self.positions.zero_()
                self.meta.load(probes.decode(1, max_context=4).attn, bs, capture_cols)
                try:
                    self.replays[bs] = self.backend.capture(step, self._args(bs, capture_cols), f"decode bs={bs}", dynamic)
                except Exception as e:  # a backend that cannot capture this bucket falls back, with the reason kept
                    if self.cfg.verify == "strict":
                        raise
                    report.status, report.reason = "rejected", "capture_failed"
                    log.warning("decode bucket %d: capture failed (%s: %s); it runs eagerly", bs, type(e).__name__, e)
                    continue
                self._verify_and_select(bs, report, probes)
        probes.release()
        self._stats.capture_seconds = time.perf_counter() - t0
        self._stats.graph_memory_bytes = self.backend.memory_bytes() or max(0, rss_bytes() - rss0)
        self._log_summary()

    def _verify_and_select(self, bs: int, report: BucketReport, probes: "ProbeBatches") -> None:
        worst = 0.0
        if self.cfg.verify != "off":
            for trial in range(VERIFY_TRIALS):
                live = bs if trial == 0 else max(1, bs - 1)  # also a padded batch
                batch = probes.decode(live, max_context=self.page_size * (3 + trial * 5))
                ref = self.mr.forward_eager(batch)
                diff, ok = compare(self._replay(batch, bucket=bs), ref, self.cfg.atol, self.cfg.rtol)
                worst = max(worst, diff)
                if not ok:
                    report.status, report.reason, report.max_abs_diff = "rejected", "bucket_rejected", diff
                    msg = f"decode bucket {bs}: graph differs from eager (max |diff| {diff:.3g})"
                    if self.cfg.verify == "strict":
                        raise RuntimeError(msg)
                    log.warning("%s; the bucket runs eagerly", msg)
                    return
        report.max_abs_diff = worst
        if self.cfg.select == "auto":
            batch = probes.decode(bs, max_context=self.page_size * 4)
            graph_ms, eager_ms = interleaved_timings(
                lambda: self._replay(batch, bucket=bs), lambda: self.mr.forward_eager(batch), TIMING_ITERS
            )
            report.graph_ms, report.eager_ms = statistics.median(graph_ms), statistics.median(eager_ms)
            if not faster(graph_ms, eager_ms):
                report.status, report.reason = "eager", "bucket_slower_than_eager"
                return
        report.status = "graph"

    def _log_summary(self) -> None:
        s = self._stats
        by_status: dict[str, list[int]] = {}
        for size, rep in sorted(s.buckets.items()):
            by_status.setdefault(rep.status, []).append(size)
        parts = ", ".join(f"{k}={v}" for k, v in sorted(by_status.items()))
        log.info(
            "decode graphs (%s): %d buckets [%s] in %.1f s, memory +%.1f MiB",
            self.cfg.mode, len(s.buckets), parts, s.capture_seconds, s.graph_memory_bytes / 2**20,
        )
