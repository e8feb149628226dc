"""Shared helpers for the compilation-layer tests: compile with the pass manager installed and read the
graph Inductor lowered."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import pytest
import torch
from torch.fx import Graph

from graphcap.compilation.config import PassConfig
from graphcap.compilation.pass_manager import PostGradPassManager
from graphcap.compilation.passes.fx_utils import AUTO_FUNCTIONALIZED


def op_counts(graph: Graph) -> Counter[str]:
    """How often each op is called, whether functionalised or direct: {"graphcap::rms_norm": 2, ...}."""
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        target = node.args[0] if node.target in AUTO_FUNCTIONALIZED else node.target
        if isinstance(target, torch._ops.OpOverload):
            counts[target._schema.name] += 1
    return counts


def compile_with_passes(fn: Callable, args: tuple, config: PassConfig) -> tuple[object, PostGradPassManager]:
    """Compile `fn` with Inductor and the pass manager, run it once; caches are off so the passes run."""
    torch._dynamo.reset()
    manager = PostGradPassManager(config, capture_graphs=True)
    with (
        manager.installed(),
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        out = torch.compile(fn, backend="inductor", dynamic=False)(*args)
    assert len(manager.graphs) == 1, "expected exactly one compiled graph (a graph break would split it)"
    return out, manager


@pytest.fixture(scope="session")
def compiler() -> Callable:
    return compile_with_passes


@pytest.fixture(scope="session")
def count_ops() -> Callable:
    return op_counts
