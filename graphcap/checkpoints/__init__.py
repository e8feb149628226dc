"""Checkpoint formats (HF directories, GGUF files): configs, tensors, tokenizers and chat templates."""
