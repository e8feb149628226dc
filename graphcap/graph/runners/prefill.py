"""Prefill graph runner: only the transformer body is graphed, keyed by the number of tokens.

Embedding (before) and final norm + logits (after) run eagerly on the live batch, and attention runs
eagerly between graph segments with the live per-request metadata. What the graph sees is therefore only
token-level tensors, so one graph per token count serves any number of requests: 4 x 32 and 1 x 128
tokens replay the same bucket.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterator

import torch

from graphcap.attention.metadata import AttentionMetadata
from graphcap.distributed.parallel_state import get_tp_group, graph_replay
from graphcap.errors import UserError
from graphcap.batch.forward_batch import ForwardBatch, ForwardMode
from graphcap.graph.backends.base import Replay
from graphcap.graph.backends.breakable import make_breakable_backend
from graphcap.graph.config import PrefillGraphConfig
from graphcap.graph.probe import ProbeBatches
from graphcap.graph.reference import Float64Reference, has_float64_reference
from graphcap.graph.runners.base import REFERENCE_MAX_TOKENS, BucketedGraphRunner

# Arguments 3..5 (block table, query index and positions) are per request: their shapes follow the
# number of requests and the longest one, never the bucket.
PER_REQUEST_DIMS = ((3, 0), (3, 1), (4, 0), (4, 1), (5, 0), (5, 1))


# A step that costs this much eagerly is compute-bound; a graph that gains less than NO_GAIN_SPEEDUP on it
# will not gain more on a larger one (see _skip_reason).
NO_GAIN_STEP_MS = 100.0
NO_GAIN_SPEEDUP = 1.03


class PrefillGraphRunner(BucketedGraphRunner):
    phase = "prefill"
    timing_iters = 7

    def __init__(self, model_runner, cfg: PrefillGraphConfig, max_prefill_tokens: int, max_model_len: int,
                 compiler=None) -> None:
        model = model_runner.model
        if not callable(getattr(model, "segmented_body", None)):
            raise UserError(
                f"{type(model).__name__} declares no segmented body (segmented_body()); prefill graphs need "
                "the model to say where its layer stack and attention breaks are"
            )
        self.mr = model_runner
        self.max_model_len = max_model_len
        # No step carries more new tokens than the prefill budget, nor more than the cache can hold.
        limit = min(max_prefill_tokens, model_runner.pool.usable_pages * model_runner.page_size)
        super().__init__(model_runner.device, cfg.mode, cfg.buckets(limit), cfg.verify, cfg.select,
                         cfg.atol, cfg.rtol)
        self._stats.clamp(cfg.sizes, self.buckets, limit, "max_prefill_tokens and KV cache tokens")
        self.cfg = cfg
        self.max_tokens = self.buckets[-1]
        hidden_size = model_runner.config.hidden_size
        dev = self.device
        self.hidden = torch.zeros(self.max_tokens, hidden_size, dtype=model_runner.dtype, device=dev)
        self.positions = torch.zeros(self.max_tokens, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(self.max_tokens, dtype=torch.int64, device=dev)
        self.out_index = torch.zeros(self.max_tokens, dtype=torch.int64, device=dev)
        self.page_size = model_runner.page_size
        if cfg.mode == "breakable":
            self.backend = make_breakable_backend(model.segmented_body(), dev, dict(cfg.inductor_options),
                                                  self.page_size)
        else:
            from graphcap.graph.backends import make_backend

            self.backend = make_backend(cfg.mode, dev, dict(cfg.inductor_options), compiler)
        # A backend that runs attention eagerly between its segments takes the live batch's metadata at
        # replay and needs no padding; one that traces attention's inputs needs per-request tensors of at
        # least 2 x 2 (padding one request to two would double the eager attention's cost).
        self.eager_attention = getattr(self.backend, "runs_attention_eagerly", False)
        self.replays: dict[int, Replay] = {}
        self.body_fn = self._body_fn()  # one function for every bucket, so a backend can share its trace

    def can_run(self, batch: ForwardBatch) -> str | None:
        if batch.mode != ForwardMode.PREFILL:
            return "not_prefill"
        tokens = batch.num_tokens
        if tokens > self.max_tokens:
            return "too_many_tokens"
        if self._bucket_for(tokens) > self.cfg.max_padding_ratio * tokens:
            return "too_much_padding"
        return self._bucket_reason(tokens)

    def _verify_and_select(self, bucket: int, report, probes: ProbeBatches) -> None:
        """Selection as for every runner, on a full bucket; then, for a kept bucket, the break-even size.

        A graph pays for its whole bucket however few tokens fill it, while eager pays for the real tokens,
        so a bucket that wins full can lose on a batch that pads it a lot (8 mixed requests, 408 tokens in
        the 512 bucket, replayed at 0.85x of eager on `small`). Both sides are timed again on the most
        padded batch the bucket takes; if the graph loses there, both costs are taken as linear between the
        two sizes and batches below the crossing (the bucket's `min_size`) run eagerly.
        """
        super()._verify_and_select(bucket, report, probes)
        if report.status != "graph" or self.select_mode != "auto":
            return
        previous = max([b for b in self.buckets if b < bucket], default=0)
        low = max(previous + 1, math.ceil(bucket / self.cfg.max_padding_ratio))
        if low >= bucket:
            return
        parts = _split(low, 4)
        batch = probes.prefill(parts, [0] * len(parts))
        graph_times, eager_times = self.time_pair(lambda: self._replay(batch, bucket), lambda: self._eager(batch))
        graph_low, eager_low = statistics.median(graph_times), statistics.median(eager_times)
        if graph_low <= eager_low:
            return
        loss_low, gain_full = graph_low - eager_low, report.eager_ms - report.graph_ms
        if gain_full <= 0:  # kept on its fastest runs though slower on medians: no safe crossing
            report.min_size = bucket
            return
        crossing = loss_low / (loss_low + gain_full)
        report.min_size = math.ceil(low + crossing * (bucket - low))

    # -- shapes ---------------------------------------------------------------------------------------
    def _size_of(self, batch: ForwardBatch) -> int:
        return batch.num_tokens

    def _body_fn(self):
        model = self.mr.model
        page_size = self.page_size

        def prefill_body(hidden, positions, slot_mapping, block_table, q_index, q_pos, out_index):
            meta = AttentionMetadata(slot_mapping, block_table, q_index, q_pos, out_index, page_size)
            return model.body(hidden, positions, meta)

        return prefill_body

    def _load(self, batch: ForwardBatch, bucket: int) -> tuple[torch.Tensor, ...]:
        """Fill the token-level static buffers (padding: token 0 at position 0, writing the padding slot,
        reading attention row 0) and return the body's arguments for this replay."""
        n = batch.num_tokens
        self.hidden[:n].copy_(self.mr.model.embed(batch.input_ids))
        self.hidden[n:bucket].zero_()
        self.positions[:n].copy_(batch.positions)
        self.positions[n:bucket].zero_()
        self.slot_mapping[:n].copy_(batch.attn.slot_mapping)
        self.slot_mapping[n:bucket].zero_()
        self.out_index[:n].copy_(batch.attn.out_index)
        self.out_index[n:bucket].zero_()
        per_request = (batch.attn.block_table, batch.attn.q_index, batch.attn.q_pos)
        if not self.eager_attention:
            per_request = tuple(_at_least_2x2(t) for t in per_request)
        return (self.hidden[:bucket], self.positions[:bucket], self.slot_mapping[:bucket], *per_request,
                self.out_index[:bucket])

    def _replay(self, batch: ForwardBatch, bucket: int) -> torch.Tensor:
        args = self._load(batch, bucket)
        with graph_replay():
            if self.eager_attention:  # the eager breaks use the live batch's out-of-graph facts
                hidden = self.replays[bucket](args, batch.attn)
            else:
                hidden = self.replays[bucket](args)
        return self.mr.model.compute_logits(hidden.index_select(0, batch.select))

    # -- capture hooks --------------------------------------------------------------------------------
    def _capture_bucket(self, bucket: int, probes: ProbeBatches) -> None:
        parts = _split(bucket, 2)
        batch = probes.prefill(parts, [3, 0][: len(parts)])
        self.replays[bucket] = self.backend.capture(
            self.body_fn, self._load(batch, bucket), f"prefill tokens={bucket}", PER_REQUEST_DIMS
        )

    def _capture_order(self) -> list[int]:
        """On CPU smallest first, so that `_skip_reason` can judge large buckets from small ones; CUDA
        captures the largest first, whose memory pool the smaller graphs then share."""
        return sorted(self.buckets, reverse=self.device.type == "cuda")

    def _skip_reason(self, bucket: int) -> str | None:
        """A graph removes a fixed per-step overhead, so its gain shrinks as the step grows. Once a smaller
        bucket whose eager step already costs NO_GAIN_STEP_MS gained less than NO_GAIN_SPEEDUP, larger ones
        would gain less still, and verifying and timing them costs seconds per call on a real model."""
        group = get_tp_group()
        if self.select_mode != "auto" or (group is not None and group.world_size > 1):
            return None  # under TP every rank must capture the same buckets: timings differ per rank
        for size, report in self._stats.buckets.items():
            if size < bucket and report.eager_ms and report.graph_ms and report.eager_ms >= NO_GAIN_STEP_MS \
                    and report.eager_ms / report.graph_ms < NO_GAIN_SPEEDUP:
                return "no_gain_at_smaller_bucket"
        return None

    def _make_reference(self) -> Float64Reference | None:
        if not has_float64_reference(self.mr.model):
            return None
        # a batch of REFERENCE_MAX_TOKENS over up to 3 requests, one on a short cached prefix
        return Float64Reference(self.mr, REFERENCE_MAX_TOKENS, REFERENCE_MAX_TOKENS // self.page_size + 4)

    def _calibration_batch(self, probes: ProbeBatches) -> ForwardBatch:
        half = REFERENCE_MAX_TOKENS // 2 - 8
        return probes.prefill([half, half], [0, 5])

    def _verify_batches(self, bucket: int, probes: ProbeBatches) -> Iterator[ForwardBatch]:
        """A full bucket split over several requests (one on a cached prefix), and a padded single request."""
        parts = _split(bucket, 3)
        padded = max(1, int(bucket / self.cfg.max_padding_ratio) + 1)
        yield probes.prefill(parts, [0, 5, 0][: len(parts)])
        yield probes.prefill([min(padded, bucket)], [0])

    def _timing_batches(self, bucket: int, probes: ProbeBatches) -> Iterator[ForwardBatch]:
        """A full bucket of four equal requests, and one of eight mixed lengths on short cached prefixes."""
        parts = _split(bucket, 4)
        mixed = _mixed(bucket, 8)
        yield probes.prefill(parts, [0] * len(parts))
        yield probes.prefill(mixed, [i % 3 for i in range(len(mixed))])


def _at_least_2x2(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad a per-request [B, X] tensor to at least 2 x 2. Compilers specialise dimensions of size 1,
    so a dynamic dimension must never be 1; the padding is harmless: an extra request row reads and writes
    only the padding page and no token's output comes from it, extra key columns lie beyond every query's
    position (masked), and extra query columns are never gathered back."""
    rows, cols = t.shape
    if rows >= 2 and cols >= 2:
        return t
    out = t.new_zeros(max(rows, 2), max(cols, 2))
    out[:rows, :cols] = t
    return out


def _mixed(total: int, parts: int) -> list[int]:
    """`total` tokens over up to `parts` requests of lengths growing 1 : 2 : ... : parts (none empty)."""
    parts = max(1, min(parts, total * 2 // (parts + 1) or 1))
    weights = range(1, parts + 1)
    lens = [max(1, total * w // sum(weights)) for w in weights]
    lens[-1] += total - sum(lens)
    return lens


def _split(total: int, parts: int) -> list[int]:
    """`total` tokens over up to `parts` requests of near-equal length (none empty)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
