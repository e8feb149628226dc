"""Decode graph runner: the whole decode step, one graph per batch-size bucket.

The runner owns shapes: it pads a live batch to the smallest bucket that holds it, fills static input
and attention-metadata buffers, replays the bucket's graph and slices the logits back. The backend only
knows how to capture and replay. At capture every bucket is verified against eager on fresh random
inputs and (with `select="auto"`) timed against eager, so a graph is served only where it is both right
and faster.
"""

from __future__ import annotations

from typing import Iterator

import torch

from graphcap.attention.metadata import StaticMetadataBuffers, decode_metadata
from graphcap.distributed.parallel_state import graph_replay
from graphcap.errors import UserError
from graphcap.batch.forward_batch import ForwardBatch, ForwardMode
from graphcap.graph.backends import make_backend
from graphcap.graph.backends.base import Replay
from graphcap.graph.backends.cpu_inductor import CPP_WRAPPER_OPTIONS
from graphcap.graph.config import DecodeGraphConfig
from graphcap.graph.probe import ProbeBatches
from graphcap.graph.reference import Float64Reference, has_float64_reference
from graphcap.graph.runners.base import REFERENCE_MAX_TOKENS, BucketedGraphRunner


VERIFY_CONTEXT_PAGES = 8  # the longest context a verification batch attends over, in pages


class DecodeGraphRunner(BucketedGraphRunner):
    phase = "decode"

    def __init__(
        self, model_runner, cfg: DecodeGraphConfig, max_running_requests: int, max_model_len: int, compiler=None
    ) -> None:
        # Every request holds at least one page, so the cache bounds the batch as much as the scheduler does.
        limit = min(max_running_requests, model_runner.pool.usable_pages)
        buckets = cfg.buckets(limit)
        if not buckets:
            raise UserError(f"no decode size in {list(cfg.sizes)} fits max_running_requests={max_running_requests} "
                            f"and a KV cache of {model_runner.pool.usable_pages} pages")
        self.mr = model_runner
        self.max_model_len = max_model_len
        super().__init__(model_runner.device, cfg.mode, buckets, cfg.verify, cfg.select, cfg.atol, cfg.rtol)
        self.cfg = cfg
        self.page_size = model_runner.page_size
        self.max_bs = buckets[-1]
        self.max_cols = -(-max_model_len // self.page_size)
        self.static_cols = self.device.type == "cuda"  # CUDA graphs fix every shape; Inductor allows one dynamic dim
        attention = cfg.attention
        if attention == "auto":
            attention = "opaque" if self.device.type == "cuda" or cfg.mode == "piecewise" else "inline"
        self.inline_attention = attention == "inline"
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        # One spare column on CPU: a compiled step sees the block table as a view of this buffer, and were the
        # view ever its full width (cols == max_cols at capture, as for a 64-position model), the compiler
        # would take its row stride for the (dynamic) width and read wrong rows at every narrower width.
        spare = 0 if self.static_cols else 1
        self.meta = StaticMetadataBuffers(self.max_bs, self.max_cols + spare, self.page_size, self.device)
        options = {**CPP_WRAPPER_OPTIONS, **dict(cfg.inductor_options)}
        self.backend = make_backend(cfg.mode, self.device, options, compiler)
        self.replays: dict[int, Replay] = {}
        self._stats.clamp(cfg.sizes, buckets, limit, "max_running_requests and KV cache pages")
        self.step_fn = self._step_fn()  # one function for every bucket, so a backend can share its trace

    def can_run(self, batch: ForwardBatch) -> str | None:
        if batch.mode != ForwardMode.DECODE:
            return "not_decode"
        if batch.batch_size > self.max_bs:
            return "batch_too_large"
        if batch.attn.block_table.shape[1] > self.max_cols:
            return "context_too_long"
        return self._bucket_reason(batch.batch_size)

    # -- shapes ---------------------------------------------------------------------------------------
    def _size_of(self, batch: ForwardBatch) -> int:
        return batch.batch_size

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

    def _replay(self, batch: ForwardBatch, bucket: int) -> torch.Tensor:
        bs = batch.batch_size
        cols = self._cols_for(batch.attn.block_table.shape[1])
        self.input_ids[:bs].copy_(batch.input_ids)
        self.input_ids[bs:bucket].zero_()
        self.positions[:bs].copy_(batch.positions)
        self.positions[bs:bucket].zero_()
        self.meta.load(batch.attn, bucket, cols)
        with graph_replay():
            return self.replays[bucket](self._args(bucket, cols))[:bs]

    # -- capture hooks --------------------------------------------------------------------------------
    def _capture_bucket(self, bucket: int, probes: ProbeBatches) -> None:
        cols = self._cols_for(4)
        self.input_ids.zero_()
        self.positions.zero_()
        self.meta.load(probes.decode(1, max_context=4).attn, bucket, cols)
        args = self._args(bucket, cols)
        self.replays[bucket] = self.backend.capture(
            self.step_fn, args, f"decode bs={bucket}", self._dynamic_dims(bucket, len(args))
        )

    def _dynamic_dims(self, bucket: int, num_args: int) -> tuple[tuple[int, int], ...]:
        """On CPU the block-table width varies per step, and every bucket shares one compile with a dynamic
        batch dimension: a cold compile of a real model costs tens of seconds. Dynamo specialises size 1, so
        the compile is made at the largest bucket (captured first) and batch 1 replays the code compiled
        for two or more; verification and timing judge that bucket like any other."""
        if self.static_cols:
            return ()
        batch = tuple((i, 0) for i in range(num_args)) if self.max_bs >= 2 else ()
        return ((3, 1), *batch)

    def _make_reference(self) -> Float64Reference | None:
        if not has_float64_reference(self.mr.model):
            return None
        requests = min(self.max_bs, REFERENCE_MAX_TOKENS // 8)
        return Float64Reference(self.mr, REFERENCE_MAX_TOKENS, requests * (VERIFY_CONTEXT_PAGES + 1))

    def _calibration_batch(self, probes: ProbeBatches) -> ForwardBatch:
        return probes.decode(min(self.max_bs, REFERENCE_MAX_TOKENS // 8),
                             max_context=self.page_size * VERIFY_CONTEXT_PAGES)

    def _verify_batches(self, bucket: int, probes: ProbeBatches) -> Iterator[ForwardBatch]:
        """A full bucket and a padded one, over different context lengths (so the KV length varies)."""
        yield probes.decode(bucket, max_context=self.page_size * 3)
        yield probes.decode(max(1, bucket - 1), max_context=self.page_size * VERIFY_CONTEXT_PAGES)

    def _timing_batches(self, bucket: int, probes: ProbeBatches) -> Iterator[ForwardBatch]:
        """A full bucket over short contexts, and a padded one over long contexts."""
        yield probes.decode(bucket, max_context=self.page_size * 4)
        yield probes.decode(max(1, bucket - 1), max_context=self.page_size * 32)
