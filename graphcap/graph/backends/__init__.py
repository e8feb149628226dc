"""Graph backends: turn a step function plus its static inputs into a zero-argument replay."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from graphcap.graph.backends.base import GraphBackend

if TYPE_CHECKING:
    from graphcap.compilation.backend import PiecewiseCompiler


def make_backend(
    mode: str, device: torch.device, inductor_options: dict | None = None, compiler: PiecewiseCompiler | None = None
) -> GraphBackend:
    """`compiler` is the engine's torch.compile backend, required for `piecewise`."""
    if mode == "piecewise":
        from graphcap.graph.backends.piecewise import PiecewiseBackend

        if compiler is None:
            raise ValueError("the piecewise graph backend needs a PiecewiseCompiler")
        return PiecewiseBackend(compiler)
    if mode == "eager":
        from graphcap.graph.backends.eager import EagerBackend

        return EagerBackend()
    if mode == "full" and device.type == "cuda":
        from graphcap.graph.backends.cuda_graph import CudaGraphBackend

        return CudaGraphBackend(device)
    if mode == "full":
        from graphcap.graph.backends.cpu_inductor import InductorBackend

        return InductorBackend(inductor_options or {})
    raise ValueError(f"no graph backend for mode {mode!r} on {device.type}")
