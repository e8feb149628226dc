"""Model building blocks, written once for eager, compiled, captured and tensor-parallel runs."""
