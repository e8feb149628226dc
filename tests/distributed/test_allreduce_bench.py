"""The all-reduce benchmark runs end to end and reports a row per size (it also checks, inside the ranks,
that every timed call in capture took the shared-memory path)."""

from __future__ import annotations

import pytest

from graphcap.bench.allreduce import format_table, measure_allreduce


@pytest.mark.slow
def test_measure_allreduce_reports_both_paths_per_size() -> None:
    rows = measure_allreduce(sizes_bytes=(4096, 65536), iters=3, warmup=1, timeout_s=120)
    assert [row["size_bytes"] for row in rows] == [4096, 65536]
    for row in rows:
        assert row["gloo_us"] > 0 and row["shm_us"] > 0
        assert row["speedup"] == pytest.approx(row["gloo_us"] / row["shm_us"])
    table = format_table(rows)
    assert "4 KB" in table and "64 KB" in table
