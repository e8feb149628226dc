"""Graph runtime: runners own shapes (buckets, padding, static buffers, counters); backends own the
mechanics of capture and replay (Inductor-compiled callables on CPU, CUDA graphs on GPU)."""
