"""Split: one fx graph per stage, with explicit receive and send ports.

A value made on stage p and used on stages c1 < c2 < ... is a boundary tensor sent from
p straight to each consumer (never relayed through the stages between). Each stage
graph takes, as placeholders, first the model inputs it uses (it loads them itself),
then the boundary tensors it receives, then the ints from shapes that earlier stages made
(``T = x.size(1)`` before the cut, used after it), which the runtime computes from the
micro-batch's sizes instead of sending them (``ppc.value``). It returns a dict of the
boundary tensors it sends, plus ``"loss"`` on the last stage. Parameters, buffers and
non-tensor values computed only from inputs are copied into every stage that uses them.
A parameter used by several stages (tied embeddings) becomes a tied group: each of those
ranks holds a copy and their gradients are summed.
"""

from __future__ import annotations

from torch import fx, nn

from ppcompile.context import BoundaryTensor, CompileContext, StageGraph
from ppcompile.errors import CompileError
from ppcompile.tracer import rebind_buffer


def split_stages(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    K = ctx.num_stages
    nodes = list(gm.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    if ctx.config.trains:
        _check_loss(ctx, output.args[0])

    # Boundary tensors: compute values used by a later stage.
    boundaries: dict[str, BoundaryTensor] = {}
    reached = gradient_reaches(nodes, output.args[0]) if ctx.config.trains else None
    for node in nodes:
        stage = node.meta.get("ppc.stage")
        if stage is None or node.op == "output":
            continue
        # The output node sits on the last stage: an inference program returns values made earlier.
        consumers = sorted({u.meta["ppc.stage"] for u in node.users} - {stage})
        if not consumers:
            continue
        if node.meta["ppc.kind"] != "tensor":
            # An int from a shape: each consumer computes it from the micro-batch's sizes.
            assert "ppc.value" in node.meta, f"partition let non-tensor {node.name} cross a cut"
            continue
        boundaries[node.name] = BoundaryTensor(
            name=node.name,
            shape=node.meta["ppc.shape"],
            dtype=node.meta["ppc.dtype"],
            # A value forward made with autograd on, whose consumers only detach it or read it
            # (argmax, a comparison), gets no gradient: its producer must not run backward from
            # a zero one, which would give its parameters zero gradients where eager gives None
            # (and AdamW would decay them).
            requires_grad=node.meta["ppc.requires_grad"] and (reached is None or node.name in reached),
            producer=stage,
            consumers=tuple(consumers),
            dim_order=node.meta.get("ppc.dim_order", ()),
        )
    ctx.boundaries = boundaries

    ctx.stage_graphs = [_stage_graph(gm, ctx, s, nodes, output) for s in range(K)]
    ctx.tied_groups = _tied_groups(gm, ctx)
    return gm


def gradient_reaches(nodes: list[fx.Node], loss: fx.Node) -> set[str]:
    """The nodes the loss's gradient flows back to: the loss, and every node with a user it
    reaches whose output requires a gradient (``.detach()``, ``argmax`` and comparisons stop it)."""
    reached = {loss.name}
    for node in reversed(nodes):
        if any(u.name in reached and u.meta.get("ppc.requires_grad", True) for u in node.users):
            reached.add(node.name)
    return reached


def _check_loss(ctx: CompileContext, loss: fx.Node) -> None:
    # propagate_shapes refused a loss that is not a scalar tensor.
    if loss.meta["ppc.stage"] != ctx.num_stages - 1:
        raise CompileError(f"{ctx.ref}: the loss {loss.name} must be computed by the last stage")


def _stage_graph(gm, ctx, stage: int, nodes: list[fx.Node], output: fx.Node) -> StageGraph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    graph_inputs, receives, sizes, modules, tensors, node_names = [], [], [], [], [], []
    own = [n for n in nodes if n.meta.get("ppc.stage") == stage and n.op != "output"]
    own_names = {n.name for n in own}
    needed_free: list[fx.Node] = []

    def need(node: fx.Node):
        """Free nodes (inputs, parameters, shape arithmetic on inputs) this stage must recreate."""
        if node.name in own_names or node in needed_free:
            return
        if node.meta.get("ppc.stage") is None:
            for dep in node.all_input_nodes:
                need(dep)
            needed_free.append(node)

    last = stage == ctx.num_stages - 1
    received = []
    # The last stage returns the output: the loss, or for inference all that forward returns.
    for node in own + ([output] if last else []):
        for dep in node.all_input_nodes:
            if dep.meta.get("ppc.stage") is not None and dep.name not in own_names:
                if dep not in received:
                    received.append(dep)
            else:
                need(dep)
    # Placeholders first (model inputs in signature order), then receives in the order they were
    # made, then the ints from shapes that earlier stages made and this one computes.
    size_nodes = [dep for dep in received if dep.name not in ctx.boundaries]
    for node in nodes:
        if node.op == "placeholder" and node in needed_free:
            env[node.name] = graph.placeholder(node.name)
            env[node.name].meta = dict(node.meta)
            graph_inputs.append(node.name)
    for dep in sorted(received, key=lambda n: (n in size_nodes, n.meta["ppc.position"])):
        env[dep.name] = graph.placeholder(dep.name)
        env[dep.name].meta = dict(dep.meta)
        (sizes if dep in size_nodes else receives).append(dep.name)
    order = {n: i for i, n in enumerate(nodes)}
    body = sorted([n for n in needed_free if n.op != "placeholder"] + own, key=order.__getitem__)
    for node in body:
        new = graph.node_copy(node, lambda n: env[n.name])
        new.name = node.name  # keep the original names: boundary ports are named after them
        env[node.name] = new
        if node.op == "call_module":
            modules.append(node.target)
        elif node.op == "get_attr":
            tensors.append(node.target)
        elif node.op == "call_function" and node.target is rebind_buffer:
            tensors.append(node.args[0])  # the stage file assigns it: it must hold it
        if node.name in own_names:
            node_names.append(node.name)
    sends = [n.name for n in own if n.name in ctx.boundaries]
    outputs = {name: env[name] for name in sends}
    if last and ctx.config.trains:
        outputs["loss"] = env[output.args[0].name]
    elif last:
        outputs["output"] = fx.map_arg(output.args[0], lambda n: env[n.name])
    graph.output(outputs)
    graph.lint()
    return StageGraph(
        stage=stage,
        graph=graph,
        graph_inputs=graph_inputs,
        receives=receives,
        sizes=sizes,
        sends=sends,
        returns_loss=last and ctx.config.trains,
        returns_output=last and not ctx.config.trains,
        modules=sorted(set(modules), key=modules.index),
        tensors=sorted(set(tensors), key=tensors.index),
        node_names=node_names,
    )


def _tied_groups(gm: fx.GraphModule, ctx: CompileContext) -> list[dict]:
    """Parameters that are one tensor under several names, or one name used by several stages."""
    model: nn.Module = gm
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    owners: dict[int, set[int]] = {}
    names_used: dict[int, set[str]] = {}
    for sg in ctx.stage_graphs:
        owned = [f"{m}.{n}" for m in sg.modules for n, _ in model.get_submodule(m).named_parameters()]
        owned += [t for t in sg.tensors if _is_parameter(model, t)]
        for fqn in owned:
            p = model.get_parameter(fqn)
            owners.setdefault(id(p), set()).add(sg.stage)
            names_used.setdefault(id(p), set()).add(fqn)
    groups = []
    for pid, stages in owners.items():
        if len(stages) > 1:
            groups.append({"parameters": sorted(names_used[pid]), "stages": sorted(stages)})
    return sorted(groups, key=lambda g: g["parameters"])


def _is_parameter(model: nn.Module, fqn: str) -> bool:
    try:
        model.get_parameter(fqn)
        return True
    except AttributeError:
        return False
