"""The model runner: owns the model and its KV cache, builds each step's ForwardBatch and dispatches it
to the phase's graph runner when that runner can take it, to eager otherwise (counting why)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from graphcap.attention.backend import TorchNativeAttnBackend
from graphcap.attention.metadata import build_metadata
from graphcap.attention.op import use_cpu_kernels
from graphcap.batch.forward_batch import ForwardBatch, ForwardMode
from graphcap.executor.kv_cache import KVCache, num_pages_for
from graphcap.models.config import ModelConfig

if TYPE_CHECKING:
    from graphcap.graph.cache import GraphCache


class GraphRunner(Protocol):
    def can_run(self, batch: ForwardBatch) -> str | None:
        """None when the batch can replay on a graph, else the reason it cannot."""

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of the batch's selected tokens."""

    def count_reject(self, reason: str) -> None:
        """Record a batch that ran eagerly, and why."""

    def stats(self) -> dict: ...


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_tokens: int,
        page_size: int,
        cpu_kernels: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.dtype = dtype
        self.device = device
        self.page_size = page_size
        attn0 = model.attention_layers()[0]
        num_pages = num_pages_for(kv_cache_tokens, page_size)
        self.kv_cache = KVCache(
            config.num_layers, num_pages, page_size, attn0.num_kv_heads, config.head_dim, dtype, device
        )
        self.kv_cache.bind(model.attention_layers())
        self.attn_backend = TorchNativeAttnBackend(cpu_kernels)
        if cpu_kernels:  # piecewise graphs reach attention through the opaque op, which looks this up
            for key in self.kv_cache.keys:
                use_cpu_kernels(key)
        for layer in model.attention_layers():
            layer.attn_backend = self.attn_backend
        self.graph_runners: dict[ForwardMode, GraphRunner] = {}
        self.compiler = None  # the piecewise compiler, when a phase uses it (graphcap.executor.setup)
        self.graph_cache: GraphCache | None = None  # where captured graphs were restored from and saved to
        self.load_seconds = 0.0
        self.kernel_build_seconds = 0.0  # building graphcap's C++ kernels (once per machine), not loading
        self.eager_steps: dict[str, int] = {m.value: 0 for m in ForwardMode}

    @property
    def pool(self):
        return self.kv_cache.pool

    def make_batch(
        self,
        mode: ForwardMode,
        token_ids: list[list[int]],
        prefix_lens: list[int],
        page_tables: list[list[int]],
    ) -> ForwardBatch:
        """Out-of-graph prepare: flatten the requests' new tokens and build attention metadata."""
        extend_lens = [len(t) for t in token_ids]
        flat = [t for ids in token_ids for t in ids]
        positions = [p + j for p, e in zip(prefix_lens, extend_lens) for j in range(e)]
        ends, total = [], 0
        for e in extend_lens:
            total += e
            ends.append(total - 1)
        dev = self.device
        return ForwardBatch(
            mode=mode,
            input_ids=torch.tensor(flat, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            attn=build_metadata(page_tables, prefix_lens, extend_lens, self.page_size, dev),
            select=torch.tensor(ends, dtype=torch.int64, device=dev),
            prefix_lens=list(prefix_lens),
            extend_lens=extend_lens,
            page_tables=page_tables,
        )

    def execute(
        self, mode: ForwardMode, token_ids: list[list[int]], prefix_lens: list[int], page_tables: list[list[int]]
    ) -> torch.Tensor:
        """One engine step from plain lists: the interface the engine drives, local or across TP ranks."""
        return self.forward(self.make_batch(mode, token_ids, prefix_lens, page_tables))

    def stats(self) -> dict:
        """Eager-step counts, cache size, and per-phase graph counters (a phase without a graph runner
        reports mode "eager"), plus the compile report."""
        out: dict = {"eager_steps": dict(self.eager_steps), "kv_cache": {"bytes": self.kv_cache.nbytes()},
                     "attention_kernel": "cpp" if self.attn_backend.use_kernels else "torch",
                     "kernel_build_seconds": round(self.kernel_build_seconds, 3)}
        for mode, name in ((ForwardMode.DECODE, "decode"), (ForwardMode.PREFILL, "prefill")):
            runner = self.graph_runners.get(mode)
            out[name] = runner.stats() if runner else {"mode": "eager", "replays": 0, "rejects": {}, "captured": []}
        out["compile"] = self.compiler.stats() if self.compiler is not None else {}
        out["graph_cache"] = self.graph_cache.stats() if self.graph_cache is not None else {"enabled": False}
        return out

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        runner = self.graph_runners.get(batch.mode)
        if runner is not None:
            reason = runner.can_run(batch)
            if reason is None:
                return runner.run(batch)
            runner.count_reject(reason)
        self.eager_steps[batch.mode.value] += 1
        return self.forward_eager(batch)

    def forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        select = None if batch.mode == ForwardMode.DECODE else batch.select
        return self.model(batch.input_ids, batch.positions, batch.attn, select)

    def shutdown(self) -> None:
        self.kv_cache.release()
        self.graph_runners.clear()
