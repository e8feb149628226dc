"""Our own model definitions, keyed by the HF `architectures` name."""
