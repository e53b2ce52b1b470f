"""Make in-place updates visible as data flow, so no cut can separate a write from its readers.

``h.mul_(0.5)`` or ``nn.ReLU(inplace=True)(h)`` change ``h`` itself, but fx records later reads of
``h`` against the node that made ``h``, not the one that changed it. A partition could then send
the old ``h`` to a later stage. This pass points every read that follows an in-place node at
that node instead (an in-place op returns the tensor it changed), so the changed value is what
flows, and what is sent.
"""

from __future__ import annotations

import operator

from torch import fx

from ppcompile.context import CompileContext
from ppcompile.tracer import assign_items

# x += y and its kin, and x[i] = v as traced.
_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    assign_items,
}


def is_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def order_mutations(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or not is_in_place(gm, node):
            continue
        for reader in list(target.users):
            if reader is not node and position[reader] > position[node]:
                reader.replace_input_with(target, node)
    gm.graph.lint()
    gm.recompile()
    return gm
