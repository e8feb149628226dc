"""Graph backends: turn a step function plus its static inputs into a zero-argument replay."""

from __future__ import annotations

import torch

from graphcap.graph.backends.base import GraphBackend


def make_backend(mode: str, device: torch.device, inductor_options: dict | None = None) -> GraphBackend:
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
