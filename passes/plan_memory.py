"""Memory planning: each rank's peak under the schedule, and recomputation where it does not fit.

For every stage: parameters, gradients, optimizer state, buffers, activations saved for backward
times the micro-batches the schedule keeps in flight on it, and transfer buffers
(``ppcompile.memory``). With ``--memory-per-device``, a stage over the budget gets regions
recomputed in backward (activation checkpointing, non-reentrant): its layers (``h.3``,
``layers.7``), cheapest recompute per byte saved first, until it fits. A recomputed region
keeps only its inputs for backward and pays its forward time again in backward. When even
recomputing every region does not fit, the error says which rank is short by how much and what
would help.

Keys written on each node:
  ppc.checkpoint   name of the recomputed region the node belongs to, else None
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ppcompile.context import CompileContext
from ppcompile.errors import CompileError
from ppcompile.memory import (
    OPTIMIZER_STATE_FACTOR,
    OPTIMIZER_STEP_TEMPORARIES,
    StageMemory,
    allocated_bytes,
    format_bytes,
    held_tensors,
    steps_every_parameter_at_once,
    storage_root,
)
from ppcompile.passes.partition_stages import assign_stages, layer_of


@dataclass(frozen=True)
class Region:
    """A run of one layer's nodes on one stage that may be recomputed in backward."""

    name: str  # the layer's FQN, e.g. transformer.h.3
    stage: int
    nodes: tuple[str, ...]
    saved_bytes: float  # activation bytes per micro-batch that recomputing it frees
    recompute_seconds: float  # its forward time, paid again in backward


def plan_memory(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    partition = ctx.partition
    try:
        plan = _plan(gm, ctx, partition.stage_times)
    except CompileError:
        if partition.fitting_cuts is None:
            raise
        plan = None
    if partition.fitting_cuts is not None and partition.fitting_cuts != partition.cut_positions:
        # Cuts that fit without recomputation win when their slowest stage is no slower.
        recomputed_bottleneck = max(plan[0]) if plan else float("inf")
        if max(partition.fitting_times) <= recomputed_bottleneck:
            partition.cut_positions = partition.fitting_cuts
            partition.stage_times = list(partition.fitting_times)
            assign_stages(gm, partition.compute_order, partition.cut_positions, ctx.num_stages)
            plan = _plan(gm, ctx, partition.stage_times)
    stage_times, ctx.memory, ctx.regions = plan
    partition.stage_times = stage_times
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in nodes.values():
        node.meta["ppc.checkpoint"] = None
    for region in ctx.regions:
        for name in region.nodes:
            nodes[name].meta["ppc.checkpoint"] = region.name
    return gm


def _plan(gm: fx.GraphModule, ctx: CompileContext, stage_times: list[float]):
    """(stage times with recomputation, StageMemory per stage, recomputed regions) for the current stages."""
    nodes = {n.name: n for n in gm.graph.nodes}
    K = ctx.num_stages
    compute = set(ctx.partition.compute_order)
    stage_nodes = [[] for _ in range(K)]
    for node in gm.graph.nodes:
        if node.name in compute:
            stage_nodes[node.meta["ppc.stage"]].append(node)
    budget = ctx.config.memory_per_device
    times, memories, regions = list(stage_times), [], []
    for stage in range(K):
        own = stage_nodes[stage]
        live = ctx.live_microbatches[stage]
        chosen: list[Region] = []
        memory = stage_memory(ctx, nodes, own, live, chosen)
        if budget is not None and memory.total > budget:
            for region in sorted(candidate_regions(nodes, own, stage), key=_price):
                chosen.append(region)
                memory = stage_memory(ctx, nodes, own, live, chosen)
                if memory.total <= budget:
                    break
            if memory.total > budget:
                raise CompileError(_does_not_fit(ctx, stage, memory, budget, bool(chosen)))
        times[stage] += sum(r.recompute_seconds for r in chosen)
        memories.append(memory)
        order = ctx.partition.compute_order
        regions.extend(sorted(chosen, key=lambda r: order.index(r.nodes[0])))
    return times, memories, regions


def _price(region: Region) -> tuple[float, str]:
    """Seconds of recompute per byte freed: cheapest first; name breaks ties deterministically."""
    return (region.recompute_seconds / max(region.saved_bytes, 1.0), region.name)


def _does_not_fit(ctx, stage: int, memory: StageMemory, budget: int, recomputing: bool) -> str:
    short = memory.total - budget
    what = "even recomputing every layer in backward" if recomputing else "and it has no layer to recompute"
    return (
        f"rank {stage} needs {format_bytes(memory.total)} but --memory-per-device is {format_bytes(budget)}, "
        f"{what}: {format_bytes(short)} short (parameters+gradients+optimizer "
        f"{format_bytes(memory.parameters + memory.gradients + memory.optimizer)}, activations "
        f"{format_bytes(memory.activations)}, working {format_bytes(memory.working)}); use more --stages, more memory per device, or smaller micro-batches"
    )


def candidate_regions(nodes: dict[str, fx.Node], own: list[fx.Node], stage: int) -> list[Region]:
    """Maximal runs of consecutive nodes of one layer whose recomputation frees memory."""
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in own:
        found = layer_of(node)
        key = f"{found[0]}.{found[1]}" if found else None
        if key is not None and runs and runs[-1][0] == key:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
    regions = []
    own_names = {n.name for n in own}
    for key, run in runs:
        if key is None:
            continue
        names = {n.name for n in run}
        inside, _ = saved_values(nodes, own_names, [n for n in run], set())
        kept = region_inputs(run, names)
        freed = _bytes(nodes, own_names, inside) - _bytes(nodes, own_names, kept)
        freed += sum(n.meta["ppc.cost"].saved_temp_bytes for n in run)
        if freed <= 0:
            continue
        seconds = sum(n.meta["ppc.cost"].forward_time for n in run)
        regions.append(Region(key, stage, tuple(n.name for n in run), float(freed), float(seconds)))
    return regions


def region_inputs(run: list[fx.Node], names: set[str]) -> set[str]:
    """Tensor values a region reads from outside itself: what checkpointing keeps for backward."""
    inputs = set()
    for node in run:
        for dep in node.all_input_nodes:
            if dep.name not in names and dep.op != "get_attr" and dep.meta.get("ppc.kind") == "tensor":
                inputs.add(dep.name)
    return inputs


def saved_values(nodes, own_names, run_nodes, skip: set[str]) -> tuple[set[str], float]:
    """Graph values the given nodes keep for backward, and the bytes of their private temporaries."""
    values, temp = set(), 0.0
    for node in run_nodes:
        if node.name in skip:
            continue
        cost = node.meta["ppc.cost"]
        values.update(v for v in cost.saved_inputs if nodes[v].op != "get_attr")
        temp += cost.saved_temp_bytes
    return values, temp


def _bytes(nodes, own_names, values: set[str]) -> float:
    """Bytes of the distinct storages ``values`` live in on this stage (views counted once)."""
    roots = {storage_root(nodes, name, own_names) for name in values} - {None}
    return sum(float(root.meta.get("ppc.nbytes", 0)) for root in roots)


def activation_bytes(nodes, own: list[fx.Node], regions: list[Region]) -> tuple[float, float]:
    """(bytes saved for backward per micro-batch, largest region's bytes while it is recomputed)."""
    own_names = {n.name for n in own}
    recomputed = {name for r in regions for name in r.nodes}
    values, temp = saved_values(nodes, own_names, own, recomputed)
    peak_region = 0.0
    for region in regions:
        run = [nodes[n] for n in region.nodes]
        values |= region_inputs(run, set(region.nodes))
        inside, inside_temp = saved_values(nodes, own_names, run, set())
        peak_region = max(peak_region, _bytes(nodes, own_names, inside) + inside_temp)
    return _bytes(nodes, own_names, values) + temp, peak_region


def stage_memory(
    ctx: CompileContext, nodes, own: list[fx.Node], live: int, regions: list[Region]
) -> StageMemory:
    own_names = {n.name for n in own}
    params, buffers = {}, {}
    for node in own:
        for t, is_param in held_tensors(ctx.spec.module, node):
            (params if is_param else buffers)[id(t)] = t.numel() * t.element_size()
    param_bytes = float(sum(params.values()))
    activations, recompute = activation_bytes(nodes, own, regions)
    # Messages: the runtime posts every receive of a step when the step starts, so a stage holds a
    # receive buffer per micro-batch for each tensor it receives and for the gradient of each tensor
    # it sends; what it sends is one micro-batch in flight.
    M = ctx.config.microbatches
    transfers, received = 0.0, set()
    for node in own:
        if node.meta.get("ppc.kind") == "tensor":
            crosses = {u.meta.get("ppc.stage") for u in node.users} - {node.meta["ppc.stage"], None}
            gradient_buffers = M if node.meta["ppc.requires_grad"] else 0
            transfers += node.meta["ppc.nbytes"] * (1 + gradient_buffers) * len(crosses)
        received.update(
            d for d in node.all_input_nodes if d.name not in own_names and d.meta.get("ppc.stage") is not None
        )
    transfers += sum(d.meta["ppc.nbytes"] * (M + (1 if d.meta["ppc.requires_grad"] else 0)) for d in received)
    largest = max((allocated_bytes(nodes, n) for n in own), default=0.0)
    optimizer = ctx.config.optimizer
    at_once = steps_every_parameter_at_once(ctx.profile.name, ctx.profiled_on)
    stepped = param_bytes if at_once else max(params.values(), default=0)
    return StageMemory(
        parameters=param_bytes,
        gradients=param_bytes,
        optimizer=param_bytes * OPTIMIZER_STATE_FACTOR[optimizer],
        buffers=float(sum(buffers.values())),
        activations_per_microbatch=activations,
        live_microbatches=live,
        transfers=transfers,
        recompute=recompute,
        working=2 * largest,
        update=float(stepped) * OPTIMIZER_STEP_TEMPORARIES[optimizer],
    )
