"""Filling one model parameter from one checkpoint tensor: the step every model's weight loading shares."""

from __future__ import annotations

import torch
from torch import nn

from graphcap.checkpoints.gguf import QuantizedBlocks


def copy_weight(
    param: nn.Parameter, tensor: torch.Tensor | QuantizedBlocks, shard: str | int | None, name: str
) -> None:
    """Cast a floating checkpoint tensor to the parameter's dtype, then let the parameter's own
    `weight_loader` place it (merged shards, tensor-parallel slices) or copy it after a shape check, so a
    mismatched checkpoint fails with the parameter's name instead of a broadcasting error."""
    if isinstance(tensor, QuantizedBlocks) and not getattr(param, "takes_blocks", False):
        tensor = tensor.dequantize()  # a GGUF's blocks, for a layer that computes in float
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and param.dtype.is_floating_point:
        tensor = tensor.to(param.dtype)
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(param, tensor, shard)
    elif param.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
    else:
        param.data.copy_(tensor)
