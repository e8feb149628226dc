"""Verification against the float64 reference on tiny: benign graphs pass, every injected fault is rejected,
both where the reference runs the batch itself and where a large prefill bucket is judged against eager
within the bound calibrated from the reference (graph/runners/base.py)."""

from __future__ import annotations

import pytest

from graphcap import LLM
from graphcap.batch.forward_batch import ForwardMode
from graphcap.graph.reference import release_float64_copy

from .faults import FAULTS, verify_with

pytestmark = pytest.mark.slow
CASES = [(ForwardMode.DECODE, 4), (ForwardMode.PREFILL, 64), (ForwardMode.PREFILL, 512)]


@pytest.fixture(scope="module")
def tiny_graphs():
    with LLM("tiny", graph_decode="full", decode_sizes=[4], graph_prefill="breakable", prefill_sizes=[64, 512],
             max_prefill_tokens=512, graph_select="always", kv_cache_tokens=2048) as llm:
        yield llm
        release_float64_copy(llm.runner)


@pytest.mark.parametrize("phase,bucket", CASES)
def test_benign_graph_passes_with_its_error_ratio_in_stats(tiny_graphs, phase, bucket):
    runner = tiny_graphs.runner.graph_runners[phase]
    ok, report = verify_with(runner, bucket, None)
    assert ok, report
    assert 0 <= report.error_ratio < 8
    stats = tiny_graphs.stats()[phase.value]["buckets"][bucket]
    assert stats["status"] == "graph" and stats["error_ratio"] is not None and stats["eager_error"] > 0


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("phase,bucket", CASES)
def test_injected_fault_is_rejected(tiny_graphs, phase, bucket, fault):
    ok, report = verify_with(tiny_graphs.runner.graph_runners[phase], bucket, FAULTS[fault])
    assert not ok, f"{fault} passed verification: {report}"
