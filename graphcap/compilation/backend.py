"""graphcap's torch.compile backend: split the traced graph at the splitting ops and compile each piece.

`torch.compile(step, backend=PiecewiseCompiler(config), fullgraph=True)` traces the step once with its token
dimension dynamic. The compiler splits that graph (2N+1 pieces for N attention layers), leaves the
splitting-op pieces (attention, all-reduce) eager and replaces every other piece with a `PieceRunner` that
compiles it for each concrete size it is called with. Pieces with the same structure share one compiled
artifact per size, so a 16-layer model compiles three pieces per size, not 33.

Per-size specialisation rather than one dynamic-shape compile: sizes are the runner's few buckets, static
shapes give Inductor fixed-size kernels, and each size's artifacts are cached like any other, so the extra
compiles are paid once per cache key. (A compile-once dynamic variant is not implemented or measured yet.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from graphcap.compilation.cache import ArtifactCache
from graphcap.compilation.config import CompilationConfig
from graphcap.compilation.pass_manager import PostGradPassManager
from graphcap.compilation.split import Piece, split_graph

log = logging.getLogger("graphcap")


@dataclass
class CompileStats:
    pieces: int = 0
    splitting_pieces: int = 0
    unique_compiles: int = 0
    loaded: int = 0
    compiled: int = 0
    compile_seconds: float = 0.0
    passes: dict[str, int] = field(default_factory=dict)

    def add_passes(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.passes[name] = self.passes.get(name, 0) + n


class PiecewiseCompiler:
    """The backend callable `(gm, example_inputs) -> callable`; one instance per engine, so artifacts are
    shared across every trace it compiles. `cuda_graphs=True` captures a CUDA graph per piece per size."""

    def __init__(
        self, config: CompilationConfig, cache: ArtifactCache | None = None, cuda_graphs: bool = False
    ) -> None:
        self.config = config
        self.cache = cache or ArtifactCache(None, "uncached", enabled=False)
        self.cuda_graphs = cuda_graphs
        self.pass_manager = PostGradPassManager(config.pass_config)
        self.artifacts: dict[tuple[str, tuple], Callable] = {}
        self.counters = CompileStats()
        self.cuda_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        split_gm, pieces = split_graph(gm, self.config.splitting_ops)
        self.counters.pieces = len(pieces)
        self.counters.splitting_pieces = sum(p.is_splitting_op for p in pieces)
        for piece in pieces:
            if not piece.is_splitting_op:
                split_gm.__dict__[piece.name] = PieceRunner(piece, self)
        log.debug("split graph into %d pieces (%d unique)", len(pieces), len({p.signature for p in pieces}))
        return split_gm

    def artifact(self, piece: Piece, size: tuple, args: Sequence[Any]) -> Callable:
        """The compiled callable for `piece` at `size`, shared by every piece with the same signature."""
        key = (piece.signature, size)
        fn = self.artifacts.get(key)
        if fn is None:
            fn = self.artifacts[key] = self._compile(piece, size, args)
        return fn

    def _compile(self, piece: Piece, size: tuple, args: Sequence[Any]) -> Callable:
        if self.config.backend == "eager":
            self.counters.unique_compiles += 1
            return piece.module
        entry = f"{piece.signature}:{size}"
        before = dict(self.pass_manager.match_counts())
        hits0 = _cache_counter("hit")
        t0 = time.perf_counter()
        with self.cache.compiling():
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(piece.module, _static_fakes(args),
                                  config_patches={"post_grad_custom_post_pass": self.pass_manager})
        seconds = time.perf_counter() - t0
        counts = {k: v - before.get(k, 0) for k, v in self.pass_manager.match_counts().items()}
        recorded = self.cache.lookup(entry)
        c = self.counters
        c.unique_compiles += 1
        c.compile_seconds += seconds
        if _cache_counter("hit") > hits0:
            c.loaded += 1
            c.add_passes(recorded["passes"] if recorded is not None else counts)
        else:
            c.compiled += 1
            c.add_passes(counts)
            self.cache.record(entry, counts, seconds)
        return compiled

    def summary(self) -> str:
        """One line for the startup log: what was loaded from the cache and what was compiled."""
        c, where = self.counters, self.cache.dir if self.cache.enabled else "disabled"
        return (f"{c.pieces} pieces ({c.splitting_pieces} run eagerly), {c.unique_compiles} unique artifacts: "
                f"{c.loaded} loaded, {c.compiled} compiled, {c.compile_seconds:.1f} s; cache {where}")

    def stats(self) -> dict:
        c = self.counters
        if not self.cache.enabled or self.config.backend == "eager":
            cache = "off"
        else:
            cache = "miss" if c.compiled else "hit"
        return {
            "pieces": c.pieces, "splitting_pieces": c.splitting_pieces, "unique_compiles": c.unique_compiles,
            "loaded": c.loaded, "compiled": c.compiled, "compile_seconds": round(c.compile_seconds, 3),
            "cache": cache, "cache_dir": str(self.cache.dir) if self.cache.enabled else None,
            "passes": dict(c.passes), "pass_skips": self.pass_manager.skip_counts(), "backend": self.config.backend,
        }


def _static_fakes(args: Sequence[Any]) -> list[Any]:
    """Fake copies of a call's arguments with their concrete sizes, under a fake mode that has a shape
    environment: Inductor's FX-graph cache refuses to cache a compile without one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]


def _cache_counter(kind: str) -> int:
    """Inductor's and AOT autograd's global cache-hit (or -miss) counters, summed."""
    from torch._dynamo.utils import counters

    return counters["inductor"][f"fxgraph_cache_{kind}"] + counters["aot_autograd"][f"autograd_cache_{kind}"]


class PieceRunner:
    """Stands in for one non-splitting submodule: picks (compiling on first use) the artifact for the
    call's concrete size and, with CUDA graphs, replays a graph captured for this piece at that size."""

    def __init__(self, piece: Piece, compiler: PiecewiseCompiler) -> None:
        self.piece = piece
        self.compiler = compiler
        self.by_size: dict[tuple, Callable] = {}
        # Inductor artifacts return a flat list even for a piece whose graph returns one tensor (seen for
        # every size after the first); the split graph expects the piece's own output structure back.
        self.single_output = isinstance(piece.module.graph.output_node().args[0], torch.fx.Node)

    def _size(self, args: tuple) -> tuple:
        return tuple(args[i].shape[d] for i, d in self.piece.size_dims) + tuple(args[i] for i in self.piece.size_ints)

    def __call__(self, *args: Any) -> Any:
        size = self._size(args)
        fn = self.by_size.get(size)
        if fn is None:
            fn = self.compiler.artifact(self.piece, size, args)
            if self.compiler.cuda_graphs:
                fn = _CudaGraphPiece(fn, args, self.compiler.cuda_pool)
            self.by_size[size] = fn
        out = fn(*args)
        if self.single_output and isinstance(out, (list, tuple)):
            return out[0]
        return out


class _CudaGraphPiece:
    """One piece at one size as a CUDA graph. Inputs that arrive at another address than at capture (the
    eager attention's outputs) are copied into the captured ones first; weights and the outputs of other
    piece graphs keep their addresses, so they cost nothing."""

    def __init__(self, fn: Callable, args: tuple, pool: Any) -> None:
        from graphcap.common.cuda_graph import capture_graph

        self.inputs = [a if isinstance(a, torch.Tensor) else None for a in args]
        self.graph, self.out = capture_graph(fn, args, pool)

    def __call__(self, *args: Any) -> Any:
        for static, arg in zip(self.inputs, args):
            if static is not None and arg.data_ptr() != static.data_ptr():
                static.copy_(arg)
        self.graph.replay()
        return self.out


def build_compiler(config: CompilationConfig, model_digest: str, device: torch.device) -> PiecewiseCompiler:
    """The engine's compiler with its artifact cache keyed for this model and configuration."""
    from graphcap.compilation.cache import cache_key

    manager = PostGradPassManager(config.pass_config)
    key = cache_key(model_digest, config, manager.uuid())
    cache = ArtifactCache(config.cache_dir, key, enabled=config.use_cache)
    return PiecewiseCompiler(config, cache, cuda_graphs=device.type == "cuda")
