"""The contract every post-grad pass meets: callable on an FX graph, counted, and hashable for caching."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import Counter
from typing import Any

from torch.fx import Graph

from graphcap.compilation.passes import fx_utils


class GraphPass:
    """A pass rewrites the graph in place and counts its rewrites in `matches`, and in `skipped`, by reason,
    the candidates it left alone for safety (so a pass that stops matching says why instead of silently
    reporting zero).

    `uuid()` hashes the source of the concrete pass (and of the shared helpers it builds on) and its
    options, so a compiled artifact made with an older pass, or the same pass configured differently, is
    never reused.
    """

    name: str = ""

    def __init__(self, **options: Any) -> None:
        self.options = dict(sorted(options.items()))
        self.matches = 0
        self.skipped: Counter[str] = Counter()

    def __call__(self, graph: Graph) -> None:
        self.matches += self.apply(graph)

    def apply(self, graph: Graph) -> int:
        """Rewrite `graph`; return how many rewrites were made."""
        raise NotImplementedError

    def uuid(self) -> str:
        h = hashlib.sha256()
        for path in (inspect.getfile(type(self)), __file__, fx_utils.__file__):
            with open(path, "rb") as f:
                h.update(f.read())
        h.update(type(self).__qualname__.encode())
        h.update(json.dumps(self.options, sort_keys=True, default=sorted).encode())
        return h.hexdigest()
