"""The higher-precision reference that capture-time verification judges graphs against.

A graph is right when it is as accurate as eager, not when it equals eager bit for bit: an Inductor
compile or a CUDA graph of the same forward reassociates float sums, and on a 30-layer model with logits
near 20 that moves fp32 logits by 1e-3 while both results are equally good. So each probe batch also runs
eagerly in float64, through a float64 copy of the model over a float64 copy of exactly the KV pages the
batch reads, and a bucket is kept when its graph's error against that reference is within a small factor
of eager's own error (`verify.accuracy_verdict` says which factor and why).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from graphcap.batch.forward_batch import ForwardBatch
from graphcap.layers.linear import UnquantizedLinearMethod
from graphcap.layers.quantization.block_quant import BlockQuantLinearMethod

if TYPE_CHECKING:
    from graphcap.executor.model_runner import ModelRunner


_FLOAT64_COPIES: "weakref.WeakKeyDictionary[ModelRunner, ModelRunner]" = weakref.WeakKeyDictionary()


def read_kv(kv_cache, slots: torch.Tensor) -> torch.Tensor:
    """Every layer's keys and values at `slots`: [2 * layers, len(slots), kv_heads, head_dim]."""
    return torch.stack([c.index_select(0, slots) for c in kv_cache.k + kv_cache.v])


def page_slots(batch: ForwardBatch, page_size: int) -> torch.Tensor:
    """Every cache slot of the batch's pages."""
    pages = torch.tensor([p for t in batch.page_tables for p in t], dtype=torch.int64)
    return (pages.unsqueeze(1) * page_size + torch.arange(page_size)).reshape(-1).to(batch.input_ids.device)


def has_float64_reference(model: torch.nn.Module) -> bool:
    """A float64 copy needs each layer's float values: plain weights, or weight-only blocks dequantised.
    FP8 layers also quantise their activations, which a float copy would not reproduce."""
    methods = (getattr(m, "quant_method", None) for m in model.modules())
    return all(method is None or isinstance(method, (UnquantizedLinearMethod, BlockQuantLinearMethod))
               for method in methods)


def float_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's parameters as plain `dtype` tensors, block-quantised weights replaced by their values.

    The reference thereby judges a graph of a quantised model against the exact weights the blocks
    encode: eager's error against it includes the kernels' rounding of activations, and so the graph's."""
    state = {k: v.to(dtype) for k, v in model.state_dict().items() if v.is_floating_point()}
    for name, module in model.named_modules(remove_duplicate=False):  # a tied table under both its names
        method = getattr(module, "quant_method", None)
        if isinstance(method, BlockQuantLinearMethod):
            state[f"{name}.weight"] = method.float_weight(module).to(dtype)
        elif getattr(module, "qtype", None) is not None:  # an embedding table kept in blocks
            state[f"{name}.weight"] = module.float_weight().to(dtype)
    return state


class Float64Reference:
    """Built on first use and dropped by `close()`, so the copy lives only while buckets are verified."""

    def __init__(self, model_runner: ModelRunner, max_tokens: int, max_pages: int) -> None:
        self.mr = model_runner
        self.max_tokens = max_tokens  # new tokens per batch: a float64 forward of more costs seconds
        self.max_pages = max_pages  # the float64 KV cache's size
        self._runner: ModelRunner | None = None

    def fits(self, batch: ForwardBatch) -> bool:
        return batch.num_tokens <= self.max_tokens and sum(map(len, batch.page_tables)) <= self.max_pages

    def _build(self) -> ModelRunner:
        """One float64 copy per model runner, shared by its decode and prefill runners' captures (building it
        copies every weight) until `release_float64_copy`."""
        shared = _FLOAT64_COPIES.get(self.mr)
        if shared is not None and shared.pool.usable_pages >= self.max_pages:
            return shared
        if shared is not None:
            shared.shutdown()
        src = self.mr.model
        with torch.device(self.mr.device):
            model = type(src)(src.config, torch.float64)
        model.load_state_dict(float_state_dict(src, torch.float64))
        copy = type(self.mr)(model.eval(), self.mr.config, torch.float64, self.mr.device,
                             self.max_pages * self.mr.page_size, self.mr.page_size, cpu_kernels=False)
        _FLOAT64_COPIES[self.mr] = copy
        return copy

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's logits and the keys/values it writes (`read_kv` layout), computed in float64 on the
        same cached keys/values it attends to."""
        if self._runner is None:
            self._runner = self._build()
        ref = self._runner
        size = self.mr.page_size
        tables = [ref.pool.alloc(len(t)) for t in batch.page_tables]
        if any(t is None for t in tables):
            raise RuntimeError("the float64 reference's KV cache is too small for this probe batch")
        try:
            src = torch.tensor([p for t in batch.page_tables for p in t], device=self.mr.device)
            dst = torch.tensor([p for t in tables for p in t], device=self.mr.device)
            offsets = torch.arange(size, device=self.mr.device)
            src_slots = (src.unsqueeze(1) * size + offsets).reshape(-1)
            dst_slots = (dst.unsqueeze(1) * size + offsets).reshape(-1)
            for ours, theirs in zip(self.mr.kv_cache.k + self.mr.kv_cache.v, ref.kv_cache.k + ref.kv_cache.v):
                theirs.index_copy_(0, dst_slots, ours.index_select(0, src_slots).to(torch.float64))
            tokens = batch.input_ids.tolist()
            per_request, start = [], 0
            for n in batch.extend_lens:
                per_request.append(tokens[start:start + n])
                start += n
            ref_batch = ref.make_batch(batch.mode, per_request, batch.prefix_lens, tables)
            logits = ref.forward_eager(ref_batch)
            return logits, read_kv(ref.kv_cache, ref_batch.attn.slot_mapping)
        finally:
            for t in tables:
                ref.pool.free(t)

    def close(self) -> None:
        self._runner = None


def release_float64_copy(model_runner: ModelRunner) -> None:
    """Free the float64 copy once every phase has captured (it holds a float64 copy of every weight)."""
    copy = _FLOAT64_COPIES.pop(model_runner, None)
    if copy is not None:
        copy.shutdown()
