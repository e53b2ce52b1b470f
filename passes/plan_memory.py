"""Memory planning: each rank's peak under the schedule, and recomputation where it does not fit.

For every stage: parameters, gradients, optimizer state, buffers, activations saved for backward
times the micro-batches the schedule keeps in flight on it, and transfer buffers
(``ppcompile.memory``). With ``--memory-per-device``, a stage over the budget gets regions
recomputed in backward (activation checkpointing, non-reentrant): its layers (``h.3``,
``layers.7``), cheapest recompute per byte saved first, until it fits. A recomputed region
keeps only its inputs for backward and pays its forward time again in backward. A layer whose
forward updates a buffer in place (BatchNorm's running statistics in training) is never
recomputed: its second forward would update the buffer again; nor is one that changes a view of
its input in place (``x[:, :1] += 1``): its second forward would start from the changed input.
A layer that changes its input itself in place (``x += self.shift``) writes a copy of it.

The partitioner hands over two partitions: the fastest, and the fastest that fits without
recomputation. Each is planned, and the faster (with its recomputation) is kept; on a tie the one
that recomputes nothing. Where neither fits even recomputing every layer it can, the partition
is searched again with every such layer recomputed, and only when that fails too does the error
say which rank is short by how much and what would help.

Keys written on each node:
  ppc.checkpoint   name of the recomputed region the node belongs to, else None
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from ppcompile.context import CompileContext
from ppcompile.errors import CompileError
from ppcompile.memory import (
    OPTIMIZER_MEMORY,
    StageMemory,
    accumulated_gradient_bytes,
    buffer_copy_bytes,
    format_bytes,
    held_tensors,
    optimizer_step_bytes,
    receive_buffer_bytes,
    recomputable,
    saved_values,
    send_buffer_bytes,
    steps_every_parameter_at_once,
    storage_root,
    working_bytes,
)
from ppcompile.passes.order_mutations import inputs_written
from ppcompile.passes.partition_stages import (
    SegmentMemory,
    assign_stages,
    layer_of,
    partition_problem,
    rectangle_sums,
    segment_memory,
    solve_partition,
    stage_cost_matrix,
    stage_times_for,
    storage_items,
    storage_union_bytes,
)


@dataclass(frozen=True)
class Region:
    """A run of one layer's nodes on one stage that may be recomputed in backward."""

    name: str  # the layer's FQN, e.g. transformer.h.3
    stage: int
    nodes: tuple[str, ...]
    # Activation bytes per micro-batch that recomputing it frees. A candidate: alone. In the plan:
    # beside the regions chosen before it, so a stage's regions add up to its activations' drop.
    saved_bytes: float
    recompute_seconds: float  # its forward time, paid again in backward


class StageDoesNotFit(CompileError):
    """A stage over the budget even with every layer it may recompute recomputed."""

    def __init__(self, stage: int, message: str):
        super().__init__(message)
        self.stage = stage


# Partitions the search under recomputation tries at most: a segment its estimate lets through
# but the plan finds over budget is ruled out, and the search runs again.
RECOMPUTE_SEARCHES = 16


def plan_memory(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    partition = ctx.partition
    # On a tie of slowest stages the first wins: the cuts that fit without recomputation.
    proposals = []
    if partition.fitting_cuts is not None:
        proposals.append((list(partition.fitting_cuts), list(partition.fitting_times)))
    if all(cuts != partition.cut_positions for cuts, _ in proposals):
        proposals.append((list(partition.cut_positions), list(partition.stage_times)))
    plans, error = [], None
    for cuts, times in proposals:
        try:
            plans.append((cuts, _plan_cuts(gm, ctx, cuts, times)))
        except CompileError as e:
            if cuts == partition.cut_positions or error is None:
                error = e  # the fastest cuts' shortfall is the one to report
    if not plans and ctx.config.memory_per_device is not None:
        found = _search_under_recomputation(gm, ctx)
        if found is not None:
            plans.append(found)
    if not plans:
        raise error
    cuts, (stage_times, memory, regions, notes) = min(plans, key=lambda p: max(p[1][0]))
    assign_stages(gm, partition.compute_order, cuts, ctx.num_stages)
    partition.cut_positions = cuts
    partition.stage_times = stage_times
    ctx.memory, ctx.regions = memory, regions
    # This pass runs again when --profile cuts again: only the kept plan's notes stay.
    ctx.notes = [n for n in ctx.notes if not n.endswith(tuple(_NOT_RECOMPUTED_NOTES.values()))] + notes
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in nodes.values():
        node.meta["ppc.checkpoint"] = None
    for region in ctx.regions:
        for name in region.nodes:
            nodes[name].meta["ppc.checkpoint"] = region.name
    return gm


def _plan_cuts(gm: fx.GraphModule, ctx: CompileContext, cuts: list[int], stage_times: list[float]):
    assign_stages(gm, ctx.partition.compute_order, cuts, ctx.num_stages)
    return _plan(gm, ctx, stage_times)


def _plan(gm: fx.GraphModule, ctx: CompileContext, stage_times: list[float]):
    """(stage times with recomputation, StageMemory per stage, recomputed regions, notes for the
    report) for the current stages; StageDoesNotFit names the first stage over the budget."""
    nodes = {n.name: n for n in gm.graph.nodes}
    K = ctx.num_stages
    compute = set(ctx.partition.compute_order)
    stage_nodes = [[] for _ in range(K)]
    for node in gm.graph.nodes:
        if node.name in compute:
            stage_nodes[node.meta["ppc.stage"]].append(node)
    budget = ctx.config.memory_per_device
    times, memories, regions, notes = list(stage_times), [], [], []
    for stage in range(K):
        own = stage_nodes[stage]
        live = ctx.live_microbatches[stage]
        chosen: list[Region] = []
        memory = stage_memory(ctx, nodes, own, live, chosen)
        if budget is not None and memory.total > budget:
            left_out = layers_not_recomputed(own)
            notes += [
                f"{_layer_list(names)} on stage {stage}: {_NOT_RECOMPUTED_NOTES[why]}"
                for why, names in left_out.items()
            ]
            for region in sorted(candidate_regions(nodes, own, stage), key=_price):
                before = memory.activations_per_microbatch
                chosen.append(region)
                memory = stage_memory(ctx, nodes, own, live, chosen)
                chosen[-1] = dataclasses.replace(
                    region, saved_bytes=before - memory.activations_per_microbatch
                )
                if memory.total <= budget:
                    break
            if memory.total > budget:
                chosen, memory = _merged_until_fits(ctx, nodes, own, stage, live, budget, chosen, memory)
            if memory.total > budget:
                raise StageDoesNotFit(stage, _does_not_fit(stage, memory, budget, bool(chosen), left_out))
        times[stage] += sum(r.recompute_seconds for r in chosen)
        memories.append(memory)
        order = ctx.partition.compute_order
        regions.extend(sorted(chosen, key=lambda r: order.index(r.nodes[0])))
    return times, memories, regions, notes


def _merged_until_fits(
    ctx: CompileContext,
    nodes,
    own: list[fx.Node],
    stage: int,
    live: int,
    budget: int,
    chosen: list[Region],
    memory: StageMemory,
) -> tuple[list[Region], StageMemory]:
    """Where recomputing every layer one by one is not enough, neighbouring layers recomputed as
    one region: each layer keeps its input for backward, and two layers recomputed together keep
    only the first's, so the value passed between them is freed (what ``torch.utils.checkpoint``
    of a run of an ``nn.Sequential`` gains; a flat ``nn.Sequential``'s single items free nothing
    alone). Starting from every recomputable layer of the stage as a region, the pair whose
    merging lowers the stage's peak most is merged, until the stage fits or no merge lowers it.
    Root code between two layers (a residual sum) joins their region."""
    position = {node.name: i for i, node in enumerate(own)}
    spans = [
        Region(key, stage, tuple(n.name for n in run), 0.0, sum(n.meta["ppc.cost"].forward_time for n in run))
        for key, run in layer_runs(own)
        if why_not_recomputed(run) is None
    ]
    if len(spans) < 2:
        return chosen, memory
    best_regions, best = chosen, memory
    regions, current = spans, stage_memory(ctx, nodes, own, live, spans)
    while current.total > budget and len(regions) > 1:
        trials = []
        for i in range(len(regions) - 1):
            merged = _merged(regions[i], regions[i + 1], own, position)
            if merged is not None:
                trial = [*regions[:i], merged, *regions[i + 2 :]]
                trials.append((stage_memory(ctx, nodes, own, live, trial).total, i, trial))
        if not trials:
            break
        total, _, trial = min(trials, key=lambda t: t[:2])
        if total >= current.total:
            break
        regions, current = trial, stage_memory(ctx, nodes, own, live, trial)
    # A layer that frees nothing alone and joined no neighbour is left out where that costs nothing.
    for region in list(regions):
        trial = [r for r in regions if r is not region]
        if " .. " not in region.name:
            memory_without = stage_memory(ctx, nodes, own, live, trial)
            if memory_without.total <= current.total:
                regions, current = trial, memory_without
    if current.total < best.total:
        best_regions, best = _with_saved_bytes(ctx, nodes, own, live, regions), current
    return best_regions, best


def _merged(first: Region, second: Region, own: list[fx.Node], position: dict[str, int]) -> Region | None:
    """``first`` and ``second`` as one region, with the root code between them; None where a node
    between them belongs to a layer or may not be recomputed."""
    start, end = position[first.nodes[0]], position[second.nodes[-1]]
    between = own[position[first.nodes[-1]] + 1 : position[second.nodes[0]]]
    if any(region_layer(n, set())[0] is not None for n in between):
        return None
    if why_not_recomputed(own[start : end + 1]) is not None:
        return None
    first_name = first.name.split(" .. ")[0]
    last_name = second.name.split(" .. ")[-1]
    return Region(
        f"{first_name} .. {last_name}",
        first.stage,
        (*first.nodes, *(n.name for n in between), *second.nodes),
        0.0,
        first.recompute_seconds
        + second.recompute_seconds
        + sum(n.meta["ppc.cost"].forward_time for n in between),
    )


def _with_saved_bytes(ctx, nodes, own, live, regions: list[Region]) -> list[Region]:
    """``regions`` each with the activation bytes it frees beside those before it, as the plan
    reports them."""
    counted, before = [], stage_memory(ctx, nodes, own, live, []).activations_per_microbatch
    for region in regions:
        after = stage_memory(ctx, nodes, own, live, [*counted, region]).activations_per_microbatch
        counted.append(dataclasses.replace(region, saved_bytes=before - after))
        before = after
    return counted


# Why a layer may not be recomputed, as the error names it -> the report's note.
BUFFERS_WRITTEN = "update buffers in forward"
INPUT_WRITTEN = "change a view of their input in place"
_NOT_RECOMPUTED_NOTES = {
    BUFFERS_WRITTEN: "not recomputed in backward, since their own code updates buffers in place "
    "(self.ema.mul_(...), self.steps += 1) and a second forward would update them twice",
    INPUT_WRITTEN: "not recomputed in backward, since they change a view of their input in place "
    "(x[:, :1] += 1) and a second forward would start from the changed input",
}


def _price(region: Region) -> tuple[float, str]:
    """Seconds of recompute per byte freed: cheapest first; name breaks ties deterministically."""
    return (region.recompute_seconds / max(region.saved_bytes, 1.0), region.name)


def _does_not_fit(
    stage: int, memory: StageMemory, budget: int, recomputing: bool, left_out: dict[str, list[str]]
) -> str:
    short = memory.total - budget
    if left_out:
        # Named, since a BatchNorm network can fit no budget by recomputation and the user should see why.
        which = " and ".join(f"{_layer_list(names)}, which {why}" for why, names in left_out.items())
        what = (
            f"even recomputing in backward every layer but {which}"
            if recomputing
            else f"and no layer can be recomputed ({which})"
        )
    elif recomputing:
        what = "even recomputing every layer in backward"
    else:
        what = "and it has no layer to recompute"
    # Every part of the total, so that they add up to it.
    trains = memory.gradients > 0  # nothing trains for inference, or with every layer frozen
    parts = [
        (
            "parameters+gradients+optimizer" if trains else "parameters",
            memory.parameters + memory.gradients + memory.optimizer,
        ),
        ("buffers", memory.buffers),
        ("transfers", memory.transfers),
    ]
    if memory.update > memory.held:
        parts.append(("optimizer step", memory.update))
    else:
        parts += [
            (
                f"activations {format_bytes(memory.activations_per_microbatch)} x {memory.live_microbatches} =",
                memory.activations,
            ),
            ("recompute", memory.recompute),
            ("working", memory.working),
        ]
    listed = ", ".join(f"{name} {format_bytes(value)}" for name, value in parts if value)
    return (
        f"rank {stage} needs {format_bytes(memory.total)} but --memory-per-device is {format_bytes(budget)}, "
        f"{what}: {format_bytes(short)} short ({listed}); "
        "use more --stages, more memory per device, or smaller micro-batches"
    )


def _layer_list(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]} ({len(names)} layers)"


def layer_runs(own: list[fx.Node]) -> list[tuple[str, list[fx.Node]]]:
    """Maximal runs of consecutive nodes of one layer call (:func:`region_layer`), each named by
    its layer and, where forward calls the layer more than once, by its call (``block call 3``:
    ALBERT's one block, run six times): the regions that recomputation chooses among. A run its
    call makes again after another layer's nodes is named by its part (``h.3 part 2``)."""
    shared = called_more_than_once(own)
    runs: list[tuple[tuple[str, int] | None, list[fx.Node]]] = []
    for node in own:
        layer, call = region_layer(node, shared)
        key = None if layer is None else (layer, call)
        if key is not None and runs and runs[-1][0] == key:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
    parts: dict[str, int] = {}
    named = []
    for key, run in runs:
        if key is None:
            continue
        name = key[0] if key[1] == 1 else f"{key[0]} call {key[1]}"
        parts[name] = parts.get(name, 0) + 1
        named.append((name if parts[name] == 1 else f"{name} part {parts[name]}", run))
    return named


def called_more_than_once(nodes: list[fx.Node]) -> set[str]:
    """The modules forward calls more than once (ALBERT's one block, a siamese backbone), by
    name: fx keys each later call's module stack entry ``name@call``."""
    if not nodes:
        return set()
    return {
        name
        for node in nodes[0].graph.nodes
        for key, (name, _) in (node.meta.get("nn_module_stack") or {}).items()
        if "@" in key
    }


def region_layer(node: fx.Node, shared: set[str]) -> tuple[str | None, int]:
    """The layer a node belongs to as recomputation sees it, and which call of it (1 for the
    first): a repeated layer (``h.3``) where the module path has one; inside a module forward
    calls more than once, that module (ALBERT's one ``nn.Sequential``, whose children are its
    parts), or the repeated layer inside it (``backbone.layers.2``); otherwise the root's child
    the node runs in (``encoder``, ``down1``), so that a model of named blocks has layers too.
    None: the root's own code, and the leaf modules it calls itself (its embedding, its head)."""
    stack = node.meta.get("nn_module_stack") or {}
    found = layer_of(node)
    layer = f"{found[0]}.{found[1]}" if found else None
    for key, (name, _) in stack.items():
        if name in shared:
            if not (found and found[0].startswith(name + ".")):
                layer = name
            return layer, int(key.split("@", 1)[1]) + 1 if "@" in key else 1
    if layer is not None or node.op == "call_module" and "." not in node.target:
        return layer, 1  # a leaf the root calls itself (its embedding, its head) is no block
    path = node.target if node.op == "call_module" else next(iter(stack.values()), ("",))[0]
    return path.split(".", 1)[0] or None, 1


def layers_not_recomputed(own: list[fx.Node]) -> dict[str, list[str]]:
    """The layers among ``own`` that may not be recomputed, by why (:func:`why_not_recomputed`)."""
    left_out: dict[str, list[str]] = {}
    for key, run in layer_runs(own):
        why = why_not_recomputed(run)
        if why is not None:
            left_out.setdefault(why, []).append(key)
    return left_out


def why_not_recomputed(run: list[fx.Node]) -> str | None:
    """Why the nodes of ``run`` may not run again in backward, else None: they update a buffer
    (``memory.recomputable``), or one writes in place, through a view, a tensor made before the
    run (``x[:, :1] += 1`` of a slice taken before it; ``order_mutations.inputs_written``). An
    input written in place directly (``x += self.shift``) is copied by the recomputed region first,
    so that its second forward starts from the input forward read."""
    if not all(recomputable(n) for n in run):
        return BUFFERS_WRITTEN
    if inputs_written(run[0].graph.owning_module, run) is None:
        return INPUT_WRITTEN
    return None


def candidate_regions(nodes: dict[str, fx.Node], own: list[fx.Node], stage: int) -> list[Region]:
    """The layers of the stage whose recomputation frees memory: what the stage saves with the layer
    recomputed is less than without (a layer's last output, a ReLU's, is often still kept as the
    next layer's input). Layers :func:`why_not_recomputed` names are left out."""
    base, _ = activation_bytes(nodes, own, [])
    regions = []
    for key, run in layer_runs(own):
        if why_not_recomputed(run) is not None:
            continue
        seconds = sum(n.meta["ppc.cost"].forward_time for n in run)
        region = Region(key, stage, tuple(n.name for n in run), 0.0, float(seconds))
        freed = base - activation_bytes(nodes, own, [region])[0]
        if freed > 0:
            regions.append(dataclasses.replace(region, saved_bytes=float(freed)))
    return regions


def region_inputs(run: list[fx.Node], names: set[str]) -> set[str]:
    """Tensor values a region reads from outside itself: what checkpointing keeps for backward."""
    inputs = set()
    for node in run:
        for dep in node.all_input_nodes:
            if dep.name not in names and dep.op != "get_attr" and dep.meta.get("ppc.kind") == "tensor":
                inputs.add(dep.name)
    return inputs


def _kept(nodes, run_nodes, skip: set[str]) -> tuple[set[str], float]:
    """Graph values the given nodes keep for backward, and the bytes of their private temporaries."""
    values, temp = set(), 0.0
    for node in run_nodes:
        if node.name in skip:
            continue
        values.update(saved_values(nodes, node))
        temp += node.meta["ppc.cost"].saved_temp_bytes
    return values, temp


def _bytes(nodes, own_names, values: set[str]) -> float:
    """Bytes of the distinct storages ``values`` live in on this stage (views counted once)."""
    roots = {storage_root(nodes, name, own_names) for name in values} - {None}
    return sum(float(root.meta.get("ppc.nbytes", 0)) for root in roots)


def activation_bytes(nodes, own: list[fx.Node], regions: list[Region]) -> tuple[float, float]:
    """(bytes saved for backward per micro-batch, largest region's bytes while it is recomputed)."""
    own_names = {n.name for n in own}
    recomputed = {name for r in regions for name in r.nodes}
    values, temp = _kept(nodes, own, recomputed)
    peak_region = 0.0
    for region in regions:
        run = [nodes[n] for n in region.nodes]
        values |= region_inputs(run, set(region.nodes))
        inside, inside_temp = _kept(nodes, run, set())
        peak_region = max(peak_region, _bytes(nodes, own_names, inside) + inside_temp)
    return _bytes(nodes, own_names, values) + temp, peak_region


def stage_memory(
    ctx: CompileContext, nodes, own: list[fx.Node], live: int, regions: list[Region]
) -> StageMemory:
    own_names = {n.name for n in own}
    held: dict[str, dict[int, int]] = {"trained": {}, "frozen": {}, "buffer": {}}
    for node in own:
        for t, role in held_tensors(ctx.spec.module, node):
            held[role][id(t)] = t.numel() * t.element_size()
    trained = held["trained"]
    trained_bytes = float(sum(trained.values()))
    activations, recompute = activation_bytes(nodes, own, regions)
    # A recomputed BatchNorm keeps a copy of its running statistics per micro-batch in flight.
    activations += sum(buffer_copy_bytes(ctx.spec.module, [nodes[name] for name in r.nodes]) for r in regions)
    # Messages (ppcompile.memory): per tensor sent, to each stage it goes to; per tensor received.
    M = ctx.config.microbatches
    transfers, received = 0.0, set()
    for node in own:
        if node.meta.get("ppc.kind") == "tensor":
            crosses = {u.meta.get("ppc.stage") for u in node.users} - {node.meta["ppc.stage"], None}
            sent = send_buffer_bytes(node.meta["ppc.nbytes"], node.meta["ppc.requires_grad"], M)
            transfers += sent * len(crosses)
        received.update(
            d
            for d in node.all_input_nodes
            if d.name not in own_names
            and d.meta.get("ppc.stage") is not None
            and d.meta["ppc.kind"] == "tensor"
        )
    transfers += sum(
        receive_buffer_bytes(d.meta["ppc.nbytes"], d.meta["ppc.requires_grad"], M) for d in received
    )
    if not ctx.config.trains and own and own[0].meta["ppc.stage"] == ctx.num_stages - 1:
        # An inference step keeps what forward returns for each of its micro-batches until it ends.
        output = next(n for n in nodes.values() if n.op == "output")
        transfers += M * sum(
            d.meta["ppc.nbytes"] for d in output.all_input_nodes if d.meta.get("ppc.kind") == "tensor"
        )
    optimizer = ctx.config.optimizer
    at_once = steps_every_parameter_at_once(ctx.profile.name, ctx.profiled_on)
    return StageMemory(
        parameters=trained_bytes + sum(held["frozen"].values()),
        gradients=trained_bytes,
        optimizer=trained_bytes * OPTIMIZER_MEMORY[optimizer].state,
        buffers=float(sum(held["buffer"].values())),
        activations_per_microbatch=activations,
        live_microbatches=live,
        transfers=transfers,
        recompute=recompute,
        working=max(
            (working_bytes(nodes, n, accumulated_gradient_bytes(ctx.spec.module, n, M)) for n in own),
            default=0.0,
        ),
        update=optimizer_step_bytes(optimizer, trained.values(), at_once),
    )


# The search under recomputation ------------------------------------------------------------------


def _search_under_recomputation(gm: fx.GraphModule, ctx: CompileContext):
    """(cuts, plan) of the fastest partition found that fits with every layer it may recompute
    recomputed, its recomputation then planned as for any cuts; None when no partition fits so.
    Two partitions are planned: the fastest counting all that recomputation, and the fastest
    counting none of it (a plan recomputes only what its stages need, so the second can be the
    faster: a shared block's six calls, two of which must be recomputed)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = [nodes[name] for name in ctx.partition.compute_order]
    n, K = len(order), ctx.num_stages
    cost = stage_cost_matrix(ctx, order, *partition_problem(gm, ctx, order))
    memory, seconds = recomputed_segment_memory(gm, ctx, order)
    budget = ctx.config.memory_per_device
    within = memory.fits(budget, ctx.live_microbatches)
    del memory  # n x n matrices each: a 4,000-node graph's are 128 MB apiece
    ruled_out: dict[int, list[tuple[int, int]]] = {k: [] for k in range(K)}

    def fits(k: int) -> torch.Tensor:
        allowed = within[ctx.live_microbatches[k]]
        if ruled_out[k]:
            allowed = allowed.clone()
            for start, end in ruled_out[k]:
                allowed[start, end] = False
        return allowed

    plans = []
    for objective in (cost + seconds, cost):
        for _ in range(RECOMPUTE_SEARCHES):
            cuts = solve_partition(objective, K, fits)
            if cuts is None:
                break
            if any(cuts == found for found, _ in plans):
                break
            try:
                plans.append((cuts, _plan_cuts(gm, ctx, cuts, stage_times_for(cost, cuts))))
                break
            except StageDoesNotFit as e:
                bounds = [0, *cuts, n]
                ruled_out[e.stage].append((bounds[e.stage], bounds[e.stage + 1] - 1))
    # On a tie the first: the partition that counted all its recomputation.
    return min(plans, key=lambda p: max(p[1][0]), default=None)


def recomputed_segment_memory(
    gm: fx.GraphModule, ctx: CompileContext, order: list[fx.Node]
) -> tuple[SegmentMemory, torch.Tensor]:
    """Every segment's peak memory with every layer in it recomputed that may be and frees memory,
    and the seconds that recomputation adds to it.

    A recomputed layer keeps only the values it reads from outside itself, and while it is
    recomputed its activations are alive again. A layer cut by the segment's start is recomputed
    from the segment's start, where that frees memory (what it made before arrives as an input);
    one cut by the segment's end up to it, where the whole layer frees memory. Whether a layer
    frees memory, and where the storage of what it saves lies (followed through views as far as
    the layer), are estimates, which the plan of the cuts found then checks."""
    nodes = {node.name: node for node in gm.graph.nodes}
    position = {node.name: i for i, node in enumerate(order)}
    n = len(order)
    saved_at: dict[str, set[int]] = {}  # storage -> positions of the nodes that save it
    for i, node in enumerate(order):
        for name in saved_values(nodes, node):
            root = storage_root(nodes, name)
            if root is not None:
                saved_at.setdefault(root.name, set()).add(i)
    # Per layer a..b: whether recomputing it from each start s in a..b frees memory (s = a: the
    # whole layer, which stages starting before it recompute too).
    runs = {}
    for _, run in layer_runs(order):
        a, b = position[run[0].name], position[run[-1].name]
        frees = [_recomputing_frees(nodes, order, saved_at, first, b) for first in range(a, b + 1)]
        if any(frees):
            runs[(a, b)] = frees
    run_of = {i: (a, b) for a, b in runs for i in range(a, b + 1)}
    items, rectangles, seconds = [], [], []
    for i, node in enumerate(order):
        cost = node.meta["ppc.cost"]
        if i in run_of:
            a, _ = run_of[i]
            frees = runs[run_of[i]]
            starts = [(0, a, frees[0])] + [(first, first, frees[first - a]) for first in range(a + 1, i + 1)]
        else:
            a, starts = -1, [(0, i, False)]
        for lo, hi, recomputed in starts:  # stages starting in lo..hi
            if not recomputed:
                for name in saved_values(nodes, node):
                    items += _clipped(storage_items(nodes, position, name, i), lo, hi)
                rectangles.append((lo, hi, i, n - 1, cost.saved_temp_bytes))
                continue
            seconds.append((lo, hi, i, n - 1, cost.forward_time))
            for dep in node.all_input_nodes:
                if dep.op == "get_attr" or dep.meta.get("ppc.kind") != "tensor":
                    continue
                made = position.get(dep.name, -1)
                if a <= made < i:
                    # Made inside the layer: an input of what the stage recomputes only when the
                    # stage starts after it, and then a storage of its own there.
                    items += _clipped([(dep.name, made + 1, i, i)], lo, hi)
                else:
                    items += _clipped(storage_items(nodes, position, dep.name, i), lo, hi)
    recompute = torch.zeros(n, n, dtype=torch.float64)
    whole = torch.zeros(n, n, dtype=torch.float64)
    for (a, b), frees in runs.items():
        peaks = {
            first: _region_peaks(nodes, position, order, first, b)
            for first in range(a, b + 1)
            if frees[first - a]
        }
        for first, found in peaks.items():
            # Stages starting at ``first``: the layer is recomputed from there.
            row = torch.tensor(found, dtype=torch.float64)
            recompute[first, first : b + 1] = torch.maximum(recompute[first, first : b + 1], row)
            recompute[first, b + 1 :] = torch.clamp(recompute[first, b + 1 :], min=float(row[-1]))
        if frees[0]:
            whole[a, b] = max(float(whole[a, b]), peaks[a][-1])
            if a > 0:
                # Stages starting before it and ending inside it: recomputed up to their end.
                prefix = torch.tensor(peaks[a], dtype=torch.float64)
                recompute[:a, a : b + 1] = torch.maximum(recompute[:a, a : b + 1], prefix[None, :])
    # Layers wholly inside a segment: the largest whose start is at or after i and end at or before j.
    whole = whole.flip(0).cummax(0).values.flip(0).cummax(1).values
    memory = dataclasses.replace(
        segment_memory(gm, ctx, order),
        activations=storage_union_bytes(n, nodes, items) + rectangle_sums(n, rectangles),
        recompute=torch.maximum(recompute, whole),
    )
    return memory, rectangle_sums(n, seconds)


def _clipped(items: list[tuple], lo: int, hi: int) -> list[tuple]:
    """``storage_items`` for stages starting in lo..hi only."""
    return [(root, max(a, lo), min(b, hi), at) for root, a, b, at in items if max(a, lo) <= min(b, hi)]


def _region_peaks(nodes, position, order, start: int, end: int) -> list[float]:
    """Per j in start..end: the bytes a region of nodes start..j saves while it is recomputed,
    storages followed through views as far as the region's start."""
    roots, total, peaks = set(), 0.0, []
    for i in range(start, end + 1):
        node = order[i]
        total += node.meta["ppc.cost"].saved_temp_bytes
        for name in saved_values(nodes, node):
            root = nodes[name]
            while root.meta.get("ppc.view_of") and position.get(root.name, start) >= start:  # free views too
                root = nodes[root.meta["ppc.view_of"]]
            if root.op != "get_attr" and root.name not in roots:
                roots.add(root.name)
                total += float(root.meta.get("ppc.nbytes", 0))
        peaks.append(total)
    return peaks


def _recomputing_frees(nodes, order, saved_at: dict[str, set[int]], a: int, b: int) -> bool:
    """Whether recomputing layer positions a..b may free memory: it updates no buffer, and it keeps
    a temporary, or saves a storage that it does not read from outside and that no node outside it
    saves too (the next layer keeps a ReLU's output, wherever the cuts fall)."""
    run = order[a : b + 1]
    if why_not_recomputed(run) is not None:
        return False
    if any(node.meta["ppc.cost"].saved_temp_bytes > 0 for node in run):
        return True
    kept = {storage_root(nodes, name) for name in region_inputs(run, {n.name for n in run})} - {None}
    kept_names = {root.name for root in kept}
    for node in run:
        for name in saved_values(nodes, node):
            root = storage_root(nodes, name)
            if root is None or root.name in kept_names or not root.meta.get("ppc.nbytes", 0):
                continue
            if all(a <= i <= b for i in saved_at.get(root.name, ())):
                return True
    return False
