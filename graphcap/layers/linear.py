"""Tensor-parallel linear layers with HF-checkpoint weight loaders.

Column-parallel layers shard output features, row-parallel ones shard input features and all-reduce.
Merged layers (qkv, gate_up) load each HF tensor into its slice through `weight_loader(param, w, shard)`.
The matmul itself is delegated to a `quant_method`, so FP8 (or any scheme) swaps in without new layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphcap.distributed.parallel_state import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce


class UnquantizedLinearMethod:
    """Plain `F.linear`; quantisation methods implement the same three hooks."""

    def create_weights(self, layer: "LinearBase", in_features: int, out_features: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        return None

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        quant_method: UnquantizedLinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_features, dtype)
        method_loader = getattr(self.quant_method, "weight_loader", None)  # a method that loads its own format
        self.weight.weight_loader = method_loader(self) if method_loader else self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.bias = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
    dst.copy_(src)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, quant_method=None):
        tp = get_tp_size()
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by tp_size {tp}")
        super().__init__(in_features, out_features // tp, bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.data.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections in one matmul (gate_up); `shard_id` is the index of the part."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype, quant_method=None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            raise ValueError("merged layer needs a shard id to place the checkpoint tensor")
        if param.data.dim() == 0 or param.data.shape[0] != self.out_features:
            _copy_checked(param.data, loaded)
            return
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. KV heads are replicated when there are fewer than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        quant_method=None,
    ) -> None:
        tp = get_tp_size()
        if num_heads % tp:
            raise ValueError(f"{num_heads} attention heads are not divisible by tp_size {tp}")
        if num_kv_heads >= tp and num_kv_heads % tp:
            raise ValueError(f"{num_kv_heads} KV heads are not divisible by tp_size {tp}")
        if num_kv_heads < tp and tp % num_kv_heads:
            raise ValueError(f"tp_size {tp} is not a multiple of {num_kv_heads} KV heads")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        total = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, total, bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.data.dim() == 0 or param.data.shape[0] != self.out_features:
            _copy_checked(param.data, loaded)
            return
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        elif shard_id == "k":
            offset, size, rank = q_size, kv_size, self.tp_rank // self.kv_replicas
        elif shard_id == "v":
            offset, size, rank = q_size + kv_size, kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        quant_method=None,
        reduce_results: bool = True,
    ) -> None:
        tp = get_tp_size()
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by tp_size {tp}")
        self.reduce_results = reduce_results
        super().__init__(in_features // tp, out_features, bias, dtype, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.data.dim() == 2 and param.data.shape[1] == self.in_features and loaded.dim() == 2:
            size = self.in_features
            loaded = loaded.narrow(1, self.tp_rank * size, size)
        _copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, None)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
