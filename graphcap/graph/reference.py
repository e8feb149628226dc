"""The higher-precision reference that capture-time verification judges graphs against.

A graph is right when it is as accurate as eager, not when it equals eager bit for bit: an Inductor
compile or a CUDA graph of the same forward reassociates float sums, and on a 30-layer model with logits
near 20 that moves fp32 logits by 1e-3 while both results are equally good. So each probe batch also runs
eagerly in float64, through a float64 copy of the model over a float64 copy of exactly the KV pages the
batch reads, and a bucket is kept when its graph's error against that reference is within a small factor
of eager's own error (`verify.accuracy_verdict` says which factor and why).
"""

from __future__ import annotations

import torch

from graphcap.executor.forward_batch import ForwardBatch
from graphcap.executor.model_runner import ModelRunner
from graphcap.layers.linear import UnquantizedLinearMethod


def has_float64_reference(model: torch.nn.Module) -> bool:
    """A float64 copy is a plain copy of the parameters; quantised layers (FP8) store other tensors."""
    return all(isinstance(getattr(m, "quant_method", None) or UnquantizedLinearMethod(), UnquantizedLinearMethod)
               for m in model.modules())


class Float64Reference:
    """Built on first use and dropped by `close()`, so the copy lives only while buckets are verified."""

    def __init__(self, model_runner: ModelRunner, max_tokens: int) -> None:
        self.mr = model_runner
        self.max_tokens = max_tokens
        self._runner: ModelRunner | None = None

    def _build(self) -> ModelRunner:
        src = self.mr.model
        with torch.device(self.mr.device):
            model = type(src)(src.config, torch.float64)
        model.load_state_dict({k: v.to(torch.float64) for k, v in src.state_dict().items()})
        return ModelRunner(model.eval(), self.mr.config, torch.float64, self.mr.device, self.max_tokens,
                           self.mr.page_size, cpu_kernels=False)

    @torch.inference_mode()
    def logits(self, batch: ForwardBatch) -> torch.Tensor:
        """The batch's logits computed in float64 on the same cached keys/values it attends to."""
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
            return ref.forward_eager(ref_batch)
        finally:
            for t in tables:
                ref.pool.free(t)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.shutdown()
            self._runner = None
