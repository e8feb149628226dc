"""The post-grad pass manager: the passes graphcap runs inside Inductor, in a fixed order.

Installed as `torch._inductor.config.post_grad_custom_post_pass`, it sees each graph after AOT autograd has
functionalised it and Inductor has run its own clean-ups, just before lowering. Order:

1. no-op elimination, so later patterns see producers and consumers adjacent;
2. RMSNorm+quant fusion, before the all-reduce fusion: where both could claim a fused-add RMSNorm (a
   tensor-parallel FP8 model), fusing the quantisation saves real memory traffic on every device, while
   the all-reduce fusion only pays off with a one-shot communicator kernel;
3. SiLU-and-mul+quant fusion;
4. all-reduce+RMSNorm fusion;
5. fix-functionalization, always, and last: the fusions match functionalised calls, and it turns every
   call, fused or not, back into an in-place one.

The manager's `uuid()` combines its passes' uuids, so Inductor's caches are keyed on exactly what ran.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from graphcap.compilation.config import PassConfig
from graphcap.compilation.passes.act_quant_fusion import ActQuantFusionPass
from graphcap.compilation.passes.allreduce_rms_fusion import AllReduceRMSNormFusionPass
from graphcap.compilation.passes.base import GraphPass
from graphcap.compilation.passes.fix_functionalization import FixFunctionalizationPass
from graphcap.compilation.passes.noop_elimination import NoOpEliminationPass
from graphcap.compilation.passes.rms_quant_fusion import RMSNormQuantFusionPass


class PostGradPassManager(CustomGraphPass):
    """Runs the enabled passes on every graph Inductor compiles.

    With `capture_graphs=True` it keeps a copy of each graph after the passes, so tests and debugging
    tools can see what Inductor lowered.
    """

    def __init__(self, config: PassConfig | None = None, capture_graphs: bool = False) -> None:
        config = config or PassConfig()
        self.config = config
        self.passes: list[GraphPass] = []
        if config.enable_noop:
            self.passes.append(NoOpEliminationPass())
        if config.enable_rms_quant_fusion:
            self.passes.append(RMSNormQuantFusionPass())
        if config.enable_act_quant_fusion:
            self.passes.append(ActQuantFusionPass())
        if config.enable_allreduce_rms_fusion:
            self.passes.append(AllReduceRMSNormFusionPass())
        self.fix_functionalization = FixFunctionalizationPass()
        self.passes.append(self.fix_functionalization)
        self.capture_graphs = capture_graphs
        self.graphs: list[Graph] = []

    def __call__(self, graph: Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)
        graph.lint()
        if self.capture_graphs:
            copy = Graph()
            copy.output(copy.graph_copy(graph, {}))
            self.graphs.append(copy)

    def uuid(self) -> str:
        h = hashlib.sha256(Path(__file__).read_bytes())
        for graph_pass in self.passes:
            h.update(graph_pass.uuid().encode())
        return h.hexdigest()

    def match_counts(self) -> dict[str, int]:
        return {graph_pass.name: graph_pass.matches for graph_pass in self.passes}

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """Per pass, the candidates it refused and why (only passes that refused any), e.g. a quant whose
        out-buffer is a partial view of its base: the first place to look when a match count is low."""
        return {p.name: dict(p.skipped) for p in self.passes if p.skipped}

    @contextlib.contextmanager
    def installed(self) -> Iterator["PostGradPassManager"]:
        """Install as Inductor's post-grad custom pass for compilations that happen inside the block."""
        with torch._inductor.config.patch(post_grad_custom_post_pass=self):
            yield self
