"""Model executor: loading, the paged KV cache, forward batches and the model runner."""
