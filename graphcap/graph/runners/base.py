"""What every graph runner shares: the capture loop (largest bucket first, progress bar, capture failures
kept as reasons), verification against eager, per-bucket eager-vs-graph selection, agreement across TP
ranks, restoring buckets from the graph cache, counters and the one-line summary. Subclasses own their
shapes: buckets, static buffers, padding, probe batches, the eager reference and the context capture runs
in (decode, prefill and encoders alike)."""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING, Callable

import torch
from tqdm import tqdm

from graphcap.distributed.parallel_state import get_tp_group, graph_capture
from graphcap.batch.forward_batch import ForwardBatch
from graphcap.graph.probe import ProbeBatches, rss_bytes
from graphcap.graph.reference import page_slots, read_kv
from graphcap.graph.stats import BucketReport, RunnerStats
from graphcap.ops.gguf_kernels import float_only
from graphcap.graph.verify import accuracy, accuracy_within, compare, faster, interleaved_timings, max_abs_error

if TYPE_CHECKING:
    from graphcap.graph.cache import GraphCache

log = logging.getLogger("graphcap")

# Eager-vs-graph timing at capture: seconds per bucket and per runner, and the fewest turns a decision takes.
TIMING_BUDGET_S = 1.5
TOTAL_TIMING_BUDGET_S = 10.0
MIN_TIMING_ITERS = 3
# The largest batch (in tokens) verified against the float64 reference itself; see _verify_against_reference.
REFERENCE_MAX_TOKENS = 256
# Verdicts of a capture or replay that raised: kept for this start, never cached (the cause may be passing).
UNCACHED_REASONS = ("capture_failed", "verify_failed")


def agree_across_ranks(report: BucketReport) -> None:
    """Under TP every rank must serve the same batches from graphs: a graph replay and an eager step
    take different collective paths, so ranks that chose differently would wait on each other forever.
    The most conservative verdict wins (rejected over eager over graph, the highest break-even size).
    Without a process group (one rank, or a stand-in group of threads) there is nobody to agree with."""
    group = get_tp_group()
    if group is None or group.world_size == 1 or not torch.distributed.is_initialized():
        return
    verdicts: list = [None] * group.world_size
    torch.distributed.all_gather_object(verdicts, (report.status, report.reason, report.min_size),
                                        group=group.cpu_group)
    rank = {"rejected": 0, "eager": 1, "graph": 2}
    report.status, report.reason, _ = min(verdicts, key=lambda v: rank.get(v[0], 0))
    report.min_size = max(v[2] for v in verdicts)


class BucketedGraphRunner:
    phase = ""
    timing_iters = 15

    def __init__(self, device: torch.device, mode: str, buckets: list, verify: str, select: str, atol: float,
                 rtol: float) -> None:
        self.device = device
        self.mode = mode
        self.buckets = buckets
        self.verify_mode = verify
        self.select_mode = select
        self.atol, self.rtol = atol, rtol
        self.backend = None  # set by subclasses
        self.cache: GraphCache | None = None  # set by capture() when it restores from and records in one
        self._stats = RunnerStats(mode=mode)

    # -- runner protocol (ModelRunner drives these) -------------------------------------------------
    def can_run(self, batch: ForwardBatch) -> str | None:
        raise NotImplementedError

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        self._stats.replays += 1
        return self._replay(batch, self._bucket_for(self._size_of(batch)))

    def count_reject(self, reason: str) -> None:
        self._stats.reject(reason)

    def stats(self) -> dict:
        return self._stats.as_dict()

    # -- subclass hooks -------------------------------------------------------------------------------
    def _size_of(self, batch: ForwardBatch) -> int:
        raise NotImplementedError

    def _replay(self, batch: ForwardBatch, bucket: int) -> torch.Tensor:
        raise NotImplementedError

    def _capture_bucket(self, bucket: int, probes: ProbeBatches) -> None:
        raise NotImplementedError

    def _verify_batches(self, bucket: int, probes: ProbeBatches) -> list[ForwardBatch]:
        raise NotImplementedError

    def _probes(self) -> ProbeBatches:
        """Where capture, verification and timing inputs come from; decoders' probes fill real KV pages
        and give them back on `release()`."""
        return ProbeBatches(self.mr, seed=1234, max_len=self.max_model_len)

    def _make_reference(self):
        """The float64 reference verification judges graphs against (graph/reference.py), or None to
        compare with eager under the configured tolerances instead."""
        return None

    def _eager(self, batch: ForwardBatch) -> torch.Tensor:
        """The reference a bucket's graph must match and beat."""
        return self.mr.forward_eager(batch)

    def _skip_reason(self, bucket) -> str | None:
        """Why a bucket is not worth capturing, judged from buckets captured before it; None to capture."""
        return None

    def _capture_context(self):
        return graph_capture()

    def _capture_order(self) -> list:
        return sorted(self.buckets, reverse=True)  # largest first: CUDA graphs share the largest's pool

    def _label(self, bucket) -> str:
        return str(bucket)

    # -- shared mechanics -----------------------------------------------------------------------------
    def _bucket_for(self, size: int) -> int:
        return next(b for b in self.buckets if b >= size)

    def _bucket_reason(self, size: int) -> str | None:
        """None when the bucket that holds `size` serves a graph for it, else why it does not."""
        report = self._stats.buckets[self._bucket_for(size)]
        if report.status != "graph":
            return report.reason
        return "padding_slower_than_eager" if size < report.min_size else None

    @torch.inference_mode()
    def capture(self, cache: GraphCache | None = None) -> None:
        """Capture every bucket, or restore it from `cache`: a bucket the cache holds takes its saved decision,
        and a graph bucket loads its compiled code and passes one cheap check instead of being verified and
        timed again; a bucket the cache does not hold (or whose code is unreadable or fails the check) is
        captured as without a cache. The decisions are recorded in `cache` afterwards."""
        t0 = time.perf_counter()
        rss0 = rss_bytes()
        probes = self._probes()
        self.cache = cache if cache is not None and cache.enabled and hasattr(self.backend, "use_cache") else None
        saved = self.cache.decisions(self.phase) if self.cache is not None else None
        if self.cache is not None:
            self.backend.use_cache(self.cache)
        self.reference = self._make_reference() if self.verify_mode != "off" else None
        self._eager_error: tuple[float, float] | None = None  # eager's error vs float64: logits, keys/values
        self._verify_calls: dict = {}  # bucket -> seconds of (graph, eager) on its first verification batch
        if saved and saved.get("eager_error"):
            self._eager_error = tuple(saved["eager_error"])
        decisions = {str(k): v for k, v in (saved or {}).get("buckets", {}).items()}
        try:
            with self._capture_context():
                bar = tqdm(self._capture_order(), desc=f"capture {self.phase} ({self.mode})",
                           unit="bucket", disable=None, leave=False)
                for bucket in bar:
                    bar.set_postfix(bucket=self._label(bucket))
                    report = self._stats.buckets[bucket] = BucketReport(bucket)
                    if self.cache is not None:
                        if self._restore_bucket(bucket, report, decisions.get(self._label(bucket)), probes):
                            self._stats.cache_hits += 1
                            continue
                        report = self._stats.buckets[bucket] = BucketReport(bucket)
                    self._capture_cold(bucket, report, probes)
        finally:
            probes.release()
            if self.reference is not None:
                self.reference.close()
                self.reference = None
        if self.cache is not None:
            self.cache.record(self.phase, self._decisions())
        self._stats.capture_seconds = time.perf_counter() - t0
        self._stats.graph_memory_bytes = self.backend.memory_bytes() or max(0, rss_bytes() - rss0)
        self._log_summary()

    def _capture_cold(self, bucket, report: BucketReport, probes: ProbeBatches) -> None:
        """Capture, verify and time one bucket (the whole of a capture without a cache)."""
        skip = self._skip_reason(bucket)
        if skip is not None:
            report.status, report.reason = "eager", skip
            agree_across_ranks(report)
            return
        t_capture = time.perf_counter()
        try:
            self._capture_bucket(bucket, probes)
        except Exception as e:  # an uncapturable bucket falls back to eager, with its reason kept
            if self.verify_mode == "strict":
                raise
            report.status, report.reason = "rejected", "capture_failed"
            log.warning("%s bucket %s: capture failed (%s: %s); it runs eagerly",
                        self.phase, self._label(bucket), type(e).__name__, e)
        else:
            self._stats.compile_seconds += time.perf_counter() - t_capture
            probes.release()  # the capture batch's pages go back before verification draws its own
            self._checked_verify_and_select(bucket, report, probes)
        finally:
            probes.release()  # so the cache never holds more than one bucket's probes
        agree_across_ranks(report)  # also after a failed capture, so no rank waits alone

    def _decisions(self) -> dict:
        """What the graph cache keeps of this capture: each bucket's report and eager's own error."""
        buckets = {self._label(b): r.as_dict() for b, r in self._stats.buckets.items()
                   if r.reason not in UNCACHED_REASONS}
        return {"eager_error": self._eager_error, "buckets": buckets}

    def _restore_bucket(self, bucket, report: BucketReport, saved: dict | None, probes: ProbeBatches) -> bool:
        """Take a cached decision. A graph bucket also gets its code, and the bucket that loads a unit of code
        from the cache checks it (`_check_restored`); when the code is unreadable or fails the check, the
        bucket is captured again (counted with the reason).

        Why once per unit rather than per bucket: buckets share their compiled code (decode's one dynamic-batch
        compile, prefill's three segment kinds), each bucket was verified on exactly that code by the cold start
        (the checksums say it is the same), and what else makes a bucket is graphcap's source (in the key).
        What a warm start can get wrong is the code it read, and one check per unit reads all of it; checking
        every bucket would replay (and run eagerly) a 2048-token prefill, seconds on a real model."""
        if saved is None:
            self._stats.cache_misses["not_cached"] += 1
            return False
        t0 = time.perf_counter()
        reason = None
        try:
            for name, value in saved.items():
                setattr(report, name, value)
            if report.status != "graph":
                return True
            cache = self.cache
            unreadable, absent, loaded = cache.unreadable, cache.absent, cache.loaded
            self._capture_bucket(bucket, probes)
            if cache.unreadable > unreadable or cache.absent > absent:  # compiled afresh: decide afresh too
                reason = "artifact_unreadable" if cache.unreadable > unreadable else "artifact_missing"
                return False
            probes.release()
            checks = self.cache.loaded > loaded and self.verify_mode != "off"
            problem = self._check_restored(bucket, probes) if checks else None
            if problem is not None:
                reason = "check_failed"
                log.warning("%s bucket %s: the cached graph failed its check (%s); capturing it again",
                            self.phase, self._label(bucket), problem)
                self.backend.discard()
                return False
            return True
        except Exception as e:  # a restore that raises is a cold capture, not a failed engine
            reason = "restore_failed"
            log.warning("%s bucket %s: restoring the cached graph failed (%s: %s); capturing it again",
                        self.phase, self._label(bucket), type(e).__name__, e)
            self.backend.discard()
            return False
        finally:
            probes.release()
            seconds = time.perf_counter() - t0
            if reason is None:
                self._stats.restore_seconds += seconds
            else:  # what was spent compiling afresh is compile time
                self._stats.cache_misses[reason] += 1
                self._stats.compile_seconds += seconds

    def _check_restored(self, bucket, probes: ProbeBatches) -> str | None:
        """None if the restored graph is right on one verification batch, else what is wrong. With eager's
        error against float64 known from the cold start, this is verification's own check without the
        float64 forward (bounded by eager's error, keys/values written and every other slot untouched);
        without it, graph and eager must agree within the configured tolerances."""
        batch = next(iter(self._verify_batches(bucket, probes)))
        scratch = BucketReport(bucket, max_abs_diff=0.0)  # the check's figures do not replace the cold start's
        if self._eager_error is not None:
            ok, detail = self._verify_against_reference(batch, bucket, scratch, probes, float64=False)
        else:
            out, eager = self._replay_after_eager(batch, bucket)
            diff, ok = compare(out, eager, self.atol, self.rtol)
            detail = f"max |graph - eager| {diff:.3g}"
        return None if ok else detail

    def _checked_verify_and_select(self, bucket: int, report: BucketReport, probes: ProbeBatches) -> None:
        """A replay that raises while being verified or timed is a rejected bucket, not a failed engine."""
        try:
            self._verify_and_select(bucket, report, probes)
        except Exception as e:
            if self.verify_mode == "strict":
                raise
            report.status, report.reason = "rejected", "verify_failed"
            log.warning("%s bucket %s: replay failed during verification (%s: %s); it runs eagerly",
                        self.phase, self._label(bucket), type(e).__name__, e)

    def _verify_and_select(self, bucket: int, report: BucketReport, probes: ProbeBatches) -> None:
        if self.verify_mode != "off" and not self._verify(bucket, report, probes):
            return
        self._select(bucket, report, probes)

    def _verify(self, bucket: int, report: BucketReport, probes: ProbeBatches) -> bool:
        """Whether the bucket's graph is as accurate as eager on every verification batch. With a float64
        reference the graph's error may be a few times eager's own (verify.ERROR_FACTOR); without one
        (encoders, FP8 layers) it must match eager within the configured tolerances."""
        t0 = time.perf_counter()
        report.max_abs_diff = 0.0
        for batch in self._verify_batches(bucket, probes):
            if self.reference is None:
                out, eager = self._replay_after_eager(batch, bucket)
                diff, ok = compare(out, eager, self.atol, self.rtol)
                report.max_abs_diff = max(report.max_abs_diff, diff)
                detail = f"max |graph - eager| {diff:.3g}"
            else:
                ok, detail = self._verify_against_reference(batch, bucket, report, probes)
            probes.release()  # batches are drawn one at a time, so a small cache still holds each
            if not ok:
                report.status, report.reason = "rejected", "bucket_rejected"
                msg = f"{self.phase} bucket {self._label(bucket)}: graph less accurate than eager ({detail})"
                if self.verify_mode == "strict":
                    raise RuntimeError(msg)
                log.warning("%s; the bucket runs eagerly", msg)
                self._stats.verify_seconds += time.perf_counter() - t0
                return False
        self._stats.verify_seconds += time.perf_counter() - t0
        return True

    def _replay_after_eager(self, batch: ForwardBatch, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        eager = self._eager(batch)
        return self._replay(batch, bucket), eager

    def _verify_against_reference(self, batch: ForwardBatch, bucket: int, report: BucketReport,
                                  probes: ProbeBatches, float64: bool = True) -> tuple[bool, str]:
        """Logits and the keys/values the step writes, each judged against float64 with eager's error as
        the yardstick, and every other slot of the batch's pages left exactly as eager left it.

        The reference reads the cache before eager or the graph run, so a graph that writes in the wrong
        place cannot agree with a reference that read its damage. The slots the step writes are poisoned
        with NaN before the replay, so a graph that does not write them (stale keys) fails even where the
        step itself attends to its new token without reading it back. Batches too large for the reference
        (large prefill buckets, where a float64 forward costs seconds) are judged against eager instead,
        within the bound the float64 check implies: eager's own error,
        measured on a smaller batch of the same model, times ERROR_FACTOR + 1. So is every batch with
        `float64=False` (the check of a graph restored from the cache).

        Block-quantised layers compute in float32 meanwhile (`float_only`), eager's and the graph's alike:
        their 8-bit activation rounding would otherwise set eager's error, and so the bar, high enough to let
        a wrong position or a stale key through.
        """
        with float_only():
            return self._judge_against_reference(batch, bucket, report, probes, float64)

    def _judge_against_reference(self, batch: ForwardBatch, bucket: int, report: BucketReport,
                                 probes: ProbeBatches, float64: bool) -> tuple[bool, str]:

        reference = self.reference.run(batch) if float64 and self.reference.fits(batch) else None
        if reference is None and self._eager_error is None:
            self._calibrate(probes)
        kv = self.mr.kv_cache
        written = batch.attn.slot_mapping
        others = page_slots(batch, self.mr.page_size)
        others = others[~torch.isin(others, written)]
        start = time.perf_counter()
        eager = self._eager(batch)
        eager_s = time.perf_counter() - start
        eager_kv = read_kv(kv, written)
        before = read_kv(kv, others)
        for cache in kv.k + kv.v:
            cache.index_fill_(0, written, float("nan"))
        start = time.perf_counter()
        out = self._replay(batch, bucket)
        self._verify_calls.setdefault(bucket, (time.perf_counter() - start, eager_s))
        intact = torch.equal(read_kv(kv, others), before)
        if reference is not None:
            logits = accuracy(out, eager, reference[0])
            keys = accuracy(read_kv(kv, written), eager_kv, reference[1])
            known = self._eager_error or (0.0, 0.0)
            self._eager_error = (max(logits.eager_error, known[0]), max(keys.eager_error, known[1]))
        else:
            logits = accuracy_within(out, eager, self._eager_error[0])
            keys = accuracy_within(read_kv(kv, written), eager_kv, self._eager_error[1])
        report.max_abs_diff = max(report.max_abs_diff, compare(out, eager, self.atol, self.rtol)[0])
        report.record_accuracy(logits.graph_error, logits.eager_error, max(logits.ratio, keys.ratio))
        against = "float64" if reference is not None else "eager (bound from float64 on a smaller batch)"
        detail = (f"logits: error vs {against} {logits.graph_error:.3g} = {logits.ratio:.3g}x eager's own "
                  f"{logits.eager_error:.3g}; written keys/values: {keys.ratio:.3g}x"
                  + ("" if intact else "; other cache slots changed"))
        return logits.ok and keys.ok and intact, detail

    def _calibrate(self, probes: ProbeBatches) -> None:
        """Eager's own error against float64, on a batch the reference can afford."""
        batch = self._calibration_batch(probes)
        ref_logits, ref_kv = self.reference.run(batch)
        eager = self._eager(batch)
        self._eager_error = (max_abs_error(eager, ref_logits),
                             max_abs_error(read_kv(self.mr.kv_cache, batch.attn.slot_mapping), ref_kv))

    def _calibration_batch(self, probes: ProbeBatches) -> ForwardBatch:
        raise NotImplementedError

    def _select(self, bucket: int, report: BucketReport, probes: ProbeBatches) -> None:
        """Keep the graph where it beats eager on every timing shape (a bucket that wins on one mix of
        requests can lose on another); a bucket that wins the first shape and loses a later one is
        demoted with its own reason. Where one pair of calls alone exceeds the per-call budget (prefill steps
        of seconds, decided on one pair anyway), the pair verification just ran on a full bucket decides the
        first shape."""
        if self.select_mode == "auto":
            for i, batch in enumerate(self._timing_batches(bucket, probes)):
                calls = self._verify_calls.get(bucket) if i == 0 else None
                if calls is not None and sum(calls) >= TIMING_BUDGET_S:
                    graph_ms, eager_ms = [calls[0] * 1e3], [calls[1] * 1e3]
                else:
                    graph_ms, eager_ms = self.time_pair(lambda: self._replay(batch, bucket),
                                                        lambda: self._eager(batch))
                if i == 0:
                    report.graph_ms, report.eager_ms = statistics.median(graph_ms), statistics.median(eager_ms)
                probes.release()
                if not faster(graph_ms, eager_ms):
                    report.status = "eager"
                    report.reason = "bucket_slower_than_eager" if i == 0 else "slower_on_another_batch_shape"
                    return
        report.status = "graph"

    def time_pair(self, graph: Callable[[], object], eager: Callable[[], object]) -> tuple[list[float], list[float]]:
        """Milliseconds per call of graph and eager, with as many interleaved turns as the budget allows:
        up to `timing_iters` for short steps; a step whose single pair of calls already exceeds what is
        left of TIMING_BUDGET_S (per call of this) and TOTAL_TIMING_BUDGET_S (per runner) is decided on
        that one pair, since a prefill of thousands of tokens of a real model costs seconds per call and
        its graph-versus-eager difference is far above the noise of one run."""
        t0 = time.perf_counter()
        try:
            start = time.perf_counter()
            graph()
            first_graph = time.perf_counter() - start
            eager()
            first_eager = time.perf_counter() - start - first_graph
            if self._one_pair_decides(first_graph + first_eager):
                return [first_graph * 1e3], [first_eager * 1e3]
            return interleaved_timings(graph, eager, self._timing_iters(first_graph + first_eager), warmup=False)
        finally:
            self._stats.timing_seconds += time.perf_counter() - t0

    def _timing_iters(self, pair_seconds: float) -> int:
        left = max(0.0, TOTAL_TIMING_BUDGET_S - self._stats.timing_seconds)
        return min(self.timing_iters, int(min(TIMING_BUDGET_S, left) / pair_seconds))

    def _one_pair_decides(self, pair_seconds: float) -> bool:
        return self._timing_iters(pair_seconds) < MIN_TIMING_ITERS

    def _timing_batches(self, bucket: int, probes: ProbeBatches) -> list[ForwardBatch]:
        raise NotImplementedError

    def _log_summary(self) -> None:
        s = self._stats
        by_status: dict[str, list[str]] = {}
        for bucket, rep in sorted(s.buckets.items()):
            by_status.setdefault(rep.status, []).append(self._label(bucket))
        parts = ", ".join(f"{k}=[{', '.join(v)}]" for k, v in sorted(by_status.items()))
        log.info("%s graphs (%s): %d buckets [%s] in %.1f s (compile+capture %.1f, verify %.1f, timing %.1f, "
                 "restore %.1f; %d from the graph cache), memory +%.1f MiB", self.phase, self.mode, len(s.buckets),
                 parts, s.capture_seconds, s.compile_seconds, s.verify_seconds, s.timing_seconds, s.restore_seconds,
                 s.cache_hits, s.graph_memory_bytes / 2**20)

