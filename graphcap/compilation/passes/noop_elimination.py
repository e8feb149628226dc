"""Remove reshapes and slices that do not change their input.

They come from model code written for any rank or width (`x.reshape(-1, d)` on an already 2-D x,
`x[..., :n]` with n the full width, reshape round trips) and sit between ops the fusion passes want to see
adjacent, so this pass runs first. A node is replaced by its input only when the shapes are equal for
every value of the symbolic sizes (`statically_known_true`), so dynamic-shape graphs stay correct.
"""

from __future__ import annotations

import sys

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from graphcap.compilation.passes.base import GraphPass

aten = torch.ops.aten
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
SLICES = (aten.slice.Tensor,)


def _shape(node: object) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and statically_known_true(sym_eq(a, b))


def _reshape_root(node: Node) -> Node:
    """The tensor at the top of a chain of reshapes ending in `node`."""
    while node.target in RESHAPES and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _full_slice(node: Node) -> bool:
    src = node.args[0]
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    shape = _shape(src)
    if shape is None or step != 1 or start not in (None, 0):
        return False
    size = shape[dim]
    return end is None or end == sys.maxsize or statically_known_true(end >= size)


class NoOpEliminationPass(GraphPass):
    name = "noop_elimination"

    def apply(self, graph: Graph) -> int:
        output = next(iter(reversed(graph.nodes)))
        count = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or output in node.users:
                continue  # an output that became its input would alias an input with an output
            if node.target in RESHAPES:
                source = _reshape_root(node)
            elif node.target in SLICES and _full_slice(node):
                source = node.args[0]
            else:
                continue
            if not _same_shape(_shape(node), _shape(source)):
                continue
            node.replace_all_uses_with(source)
            _erase_dead_chain(graph, node)
            count += 1
        return count


def _erase_dead_chain(graph: Graph, node: Node) -> None:
    """Erase `node` and the reshapes above it that it alone kept alive."""
    while node.target in RESHAPES + SLICES and not node.users:
        parent = node.args[0]
        graph.erase_node(node)
        if not isinstance(parent, Node):
            return
        node = parent

