"""The lowest floor: helpers every package may use (hashing, the cache directory, the CUDA-graph primitive).
It imports no other graphcap package."""
