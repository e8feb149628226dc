"""Benchmarks (BENCHMARKS.md): `graphcap bench` (runner.py and the per-phase modules) and the all-reduce
micro-benchmark (allreduce.py). Nothing is imported here, so importing one benchmark never pays for another."""
