"""Make in-place updates visible as data flow, so no cut can separate a write from its readers.

``h.mul_(0.5)`` or ``nn.ReLU(inplace=True)(h)`` change ``h`` itself, but fx records later reads of
``h`` against the node that made ``h``, not the one that changed it. A partition could then send
the old ``h`` to a later stage. This pass points every read that follows an in-place node at
that node instead (an in-place op returns the tensor it changed), so the changed value is what
flows, and what is sent.

A parameter or buffer that forward changes in place from parameters and buffers alone (SwAV's
``self.prototypes.weight.copy_(F.normalize(...))`` under no_grad, MoCo's momentum update of its key
encoder) is read by its module's call implicitly, which no rewiring can show. Those writes, with
what computes them, move to just before the first call of a module holding the tensor: the
partitioner keeps a written tensor's writers and readers on one stage
(``partition_stages.buffer_spans``), and left at the top of forward, where models write them, they
would hold every layer up to that call on the first stage.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ppcompile.check_training import RANDOM_CALLS
from ppcompile.context import CompileContext
from ppcompile.errors import CompileError
from ppcompile.tracer import assign_items, rebind_buffer

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
    """Whether ``node`` writes into its first argument (a model's own autograd Function that marks it
    dirty: as ``estimate_costs`` found it, once that pass has run)."""
    if node.meta.get("ppc.writes_input"):
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


# Methods whose result shares its input's storage, known before shapes are propagated.
VIEW_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "unsqueeze",
        "squeeze",
        "expand",
        "permute",
        "transpose",
        "t",
        "flatten",
        "unflatten",
    }
)


def written_attribute(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The parameter or buffer ``node`` rebinds (``self.ema = ...``) or writes in place
    (``self.steps.add_(1)``, ``self.queue[0] = k``, through views and earlier writes), by name;
    else None."""
    if node.op == "call_function" and node.target is rebind_buffer:
        return node.args[0]
    root = written_root(gm, node)
    return root.target if root is not None and root.op == "get_attr" else None


def written_root(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node whose tensor in-place ``node`` changes, through views and earlier writes
    (``flat = acc.view(-1); flat -= 0.5`` changes ``acc``'s); None when ``node`` writes nothing."""
    if not is_in_place(gm, node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return storage_of(gm, node.args[0])


def written_buffers(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """The parameters and buffers ``node`` writes, by name: :func:`written_attribute`'s, or every
    buffer of a layer whose forward updates its own (BatchNorm's running statistics in training;
    ``ppc.writes_buffers``, known once ``estimate_costs`` has run)."""
    name = written_attribute(gm, node)
    if name is not None:
        return [name]
    if node.op == "call_module" and node.meta.get("ppc.writes_buffers"):
        return [f"{node.target}.{b}" for b, _ in gm.get_submodule(node.target).named_buffers()]
    return []


def _snapshot_module_buffers(gm: fx.GraphModule) -> None:
    """Point each read of a layer's buffer made after a call of that layer at a copy taken just
    after the call (``h - self.bn.running_mean`` after ``self.bn(x)``). The call may update the
    buffer in place (BatchNorm's running statistics), which no node shows: read as an attribute,
    it would be read on whatever stage the reader falls on, from that rank's own copy, which the
    layer's stage updates and no other. The copy is a value like any other, sent where it is read,
    and ``partition_stages.buffer_spans`` keeps it on the call's stage."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    buffers = {node.target: node for node in gm.graph.nodes if node.op == "get_attr"}
    # The last call first: a read after two calls of the layer takes the later one's copy.
    copies = set()
    for call in reversed([n for n in gm.graph.nodes if n.op == "call_module"]):
        for name, _ in gm.get_submodule(call.target).named_buffers():
            read = buffers.get(f"{call.target}.{name}")
            later = (
                [u for u in read.users if u not in copies and position[u] > position[call]] if read else []
            )
            if not later:
                continue
            after = call
            if position[read] > position[call]:
                call.append(read)  # fx put the attribute where forward first read it, after the call
                after = read
            with gm.graph.inserting_after(after):
                copy = gm.graph.create_node(
                    "call_function", torch.clone, (read,), name=f"{read.name}_after_{call.name}"
                )
            copies.add(copy)
            for user in later:
                user.replace_input_with(read, copy)
            position = {node: i for i, node in enumerate(gm.graph.nodes)}


def storage_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node that made the tensor ``node`` is, or is a view of, through in-place writes."""
    while node.op not in ("get_attr", "placeholder") and node.args and isinstance(node.args[0], fx.Node):
        if not (is_in_place(gm, node) or node.meta.get("ppc.view_of") is not None or is_view(node)):
            break
        node = node.args[0]
    return node


def inputs_written(gm: fx.GraphModule, run: list[fx.Node]) -> list[fx.Node] | None:
    """The values made before ``run`` that its nodes write in place, as ``run`` reads them
    (``x += self.shift`` on a layer's input): run again, as recomputation in backward runs it, it
    must write a copy, or it would start from the written value. None where a node writes one
    through a view (``x[:, :1] += 1`` of a slice taken before ``run``, ``x.view(-1).zero_()``): a
    copy would hide the write from what else reads the viewed tensor."""
    names = {n.name for n in run}
    written = []
    for node in run:
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or not is_in_place(gm, node):
            continue
        if storage_of(gm, target).name in names:
            continue  # the run's own value
        # Earlier writes before the run hand on the same tensor; any view on the way is shared.
        source = target
        while source.name not in names and is_in_place(gm, source):
            source = source.args[0]
        if source.name in names or _made_as_view(source):
            return None
        if target not in written:
            written.append(target)
    return written


def _made_as_view(node: fx.Node) -> bool:
    return node.meta.get("ppc.view_of") is not None or is_view(node)


def is_view(node: fx.Node) -> bool:
    """Whether ``node`` returns a view of its first argument (known before shapes are propagated)."""
    if node.op == "call_function":
        return node.target is operator.getitem or (node.target is getattr and node.args[1:] == ("data",))
    return node.op == "call_method" and node.target in VIEW_METHODS


def order_mutations(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or not is_in_place(gm, node):
            continue
        for reader in list(target.users):
            if reader is not node and position[reader] > position[node]:
                reader.replace_input_with(target, node)
    writes: dict[str, list[fx.Node]] = {}  # parameter or buffer -> the nodes writing it, in order
    for node in gm.graph.nodes:
        if (name := written_attribute(gm, node)) is not None:
            writes.setdefault(name, []).append(node)
    _refuse_trained_weights_written(gm, ctx, writes)
    _move_writes_to_their_modules(gm, writes)
    _snapshot_module_buffers(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _refuse_trained_weights_written(
    gm: fx.GraphModule, ctx: CompileContext, writes: dict[str, list[fx.Node]]
) -> None:
    """A parameter the optimizer trains, changed in place by forward: in a pipeline a later
    micro-batch's forward would change the weight while an earlier one's backward still needs it."""
    trained = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}
    for name, nodes in writes.items():
        if name in trained:
            raise CompileError(
                f"{ctx.ref}: forward changes the trained parameter `{name}` in place (`{nodes[0].name}`); "
                "with micro-batches in flight a later forward would change it under an earlier backward. "
                "Change it in the training loop after optimizer.step(), or compute the changed value in "
                "forward without writing it back (w = F.normalize(self.weight, dim=1))"
            )


def _move_writes_to_their_modules(gm: fx.GraphModule, writes: dict[str, list[fx.Node]]) -> None:
    """Each parameter or buffer written in place from parameters and buffers alone: its writes, and
    the nodes computing them, move to just before the first later call of a module holding it,
    where nothing else reads what moves before that call."""
    from_attributes: set[fx.Node] = set()
    for node in gm.graph.nodes:
        drawn = str(getattr(node.target, "__name__", node.target)) in RANDOM_CALLS
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method")
            and not drawn  # a random draw moved would draw other numbers than eager's
            and all(dep in from_attributes for dep in node.all_input_nodes)
        ):
            from_attributes.add(node)
    for name, written in writes.items():
        if not all(w in from_attributes and w.target is not rebind_buffer for w in written):
            continue  # written from activations, or rebound: it stays where the model writes it
        position = {node: i for i, node in enumerate(gm.graph.nodes)}
        last = max(position[w] for w in written)
        reader = next(
            (
                n
                for n in gm.graph.nodes
                if n.op == "call_module" and name.startswith(n.target + ".") and position[n] > last
            ),
            None,
        )
        if reader is None:
            continue
        moved, pending = set(), list(written)
        while pending:
            node = pending.pop()
            if node not in moved and node.op != "get_attr":
                moved.add(node)
                pending += node.all_input_nodes
        if any(u not in moved and position[u] < position[reader] for node in moved for u in node.users):
            continue
        for node in sorted(moved, key=position.__getitem__):
            reader.prepend(node)
