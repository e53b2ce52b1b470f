"""Partition: K contiguous stages in topological order that minimise the slowest stage.

The compute nodes are laid out in the traced (topological) order; a partition is K-1 cut
positions in that order. A stage's time is its nodes' forward + backward time plus the
link occupancy (bytes over bandwidth) of every tensor that enters it (made earlier, used
here) or leaves it (made here, used later), activations forward and gradients backward,
plus one send call per cut it borders: the runtime packs everything a cut carries one way
into one message, so a stage after a cut makes one SEND_B and one before it one SEND_F per
micro-batch however many tensors cross (a skip to a stage further on is a message of its
own, which this leaves out). Cutting inside a transformer block, where the residual and the
block's inner value both cross, then costs their bytes, not another call. The link's
latency is left out: it delays a message without keeping either rank busy, and in a
pipeline's steady state each pair of neighbouring stages pays it once per micro-batch
wherever the cut falls, so it cannot favour one balance over another. Counting it as stage
time starves the middle stages, which pay it on both sides; the simulator charges it as the
delay it is. That cost depends only on the stage's first and last node, so all N*N stage
costs form one matrix, built in O(N^2) from 2-D prefix sums, and a dynamic program over it
finds the optimum exactly:

    best[k][j] = min over i of max(best[k-1][i-1], cost[i][j])

Among the partitions that reach the optimum, a second pass picks the one with the
smallest sum of squared stage times, so the stages that do not bound the step are
balanced too. Cuts may fall anywhere, inside a transformer block included, except where
a value that cannot be sent is live across the cut: a tuple holding tensors, a device. An int
from ``x.size()`` (or a torch.Size, or a float constant) can cross: the stage that uses it
computes it from the micro-batch's sizes (``ppc.value``), so it costs no transfer.

Placeholders, parameters and buffers, non-tensor values computed only from them, and tensors
without a gradient that a cheap operation makes from those (a buffer's slice, a mask from the
inputs: ``is_free``) are not placed: every stage that uses one loads or makes it again.

Keys written on each node:
  ppc.stage        stage index of a compute node (and of the output node); None for free nodes
  ppc.position     index in the compute order (compute nodes)
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from ppcompile.context import CompileContext, Partition
from ppcompile.errors import CompileError
from ppcompile.memory import (
    accumulated_gradient_bytes,
    held_tensors,
    optimizer_step_bytes,
    parameter_bytes_held,
    receive_buffer_bytes,
    saved_values,
    send_buffer_bytes,
    steps_every_parameter_at_once,
    working_bytes,
)
from ppcompile.passes.order_mutations import (
    VIEW_METHODS,
    is_view,
    storage_of,
    written_buffers,
    written_root,
)
from ppcompile.tracer import is_effect

# The least share of the slowest stage's time that dividing a layer across a cut must save.
DIVIDE_GAIN = 0.01


@dataclass(frozen=True)
class CrossingValue:
    """A value made at ``producer`` and used at ``consumers`` (positions in the compute order)."""

    producer: int
    consumers: tuple[int, ...]
    transfer_time: float  # seconds it occupies the link, forward and its gradient back
    # What it costs the stage it leaves, where that differs from the stage it enters: the copy
    # joining a divided layer's pieces is paid by the stage that holds the join alone.
    leaving_time: float | None = None


def partition_stages(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    K = ctx.num_stages
    if K < 1:
        raise CompileError(f"--stages must be at least 1, got {K}")
    order = compute_order(gm)
    _refuse_renormed_weights_read_elsewhere(gm, ctx, order)
    times, values, forbidden = partition_problem(gm, ctx, order)
    legal_cuts = len(order) - 1 - len(forbidden)
    held = _held_together(gm, order)
    ctx.notes = [n for n in ctx.notes if not n.endswith(_HELD_NOTE)] + held
    if K - 1 > legal_cuts:
        raise CompileError(
            f"{_stages_text(ctx)} needs {K - 1} cuts but {ctx.ref} has only {legal_cuts} places it can be cut "
            f"({len(order)} compute nodes"
            + (", each linear layer's bands of columns counted" if divided_layer_spans(order) else "")
            + f"); use {legal_cuts + 1} stages or fewer in all"
            + (f"; {held[0]}" if held else "")
        )
    cost = stage_cost_matrix(ctx, order, times, values, forbidden)
    cuts = solve_partition(cost, K)
    inside = cuts_inside_divided_layers(order)
    if inside:
        # A layer is divided only where that evens the stages by more than DIVIDE_GAIN: its pieces
        # cost a second weight on the other rank, a tied gradient to sum and two smaller matrix
        # products, none of which the stage times count.
        whole = forbid_cuts(cost.clone(), inside)
        whole_cuts = solve_partition(whole, K)
        if whole_cuts is not None and (
            cuts is None
            or max(stage_times_for(cost, cuts)) > (1 - DIVIDE_GAIN) * max(stage_times_for(whole, whole_cuts))
        ):
            cost, cuts = whole, whole_cuts
    fitting = None
    if ctx.config.memory_per_device is not None:
        # The best cuts that fit without recomputation; plan_memory weighs them against the fastest
        # cuts with layers recomputed, and keeps whichever gives the faster slowest stage.
        fitting = solve_partition(cost, K, memory_fits(gm, ctx, order, ctx.config.memory_per_device))
    if cuts is None:
        raise CompileError(f"no partition of {ctx.ref} into {K} stages exists; use fewer stages")
    ctx.partition = Partition(
        cut_positions=list(cuts),
        stage_times=stage_times_for(cost, cuts),
        compute_order=[n.name for n in order],
        compute_floor_times=compute_floor(times, forbidden, K),
    )
    if fitting is not None:
        ctx.partition.fitting_cuts = list(fitting)
        ctx.partition.fitting_times = stage_times_for(cost, fitting)
    assign_stages(gm, ctx.partition.compute_order, ctx.partition.cut_positions, K)
    even = even_layer_cuts(order, K)
    if even is not None:
        times = stage_times_for(cost, even)
        # infinite where one of its cuts would cross what may not be cut: the report says so
        ctx.partition.even_split_times = times if all(map(math.isfinite, times)) else None
        ctx.partition.even_split_layers = even_layer_count(order)
    return gm


def _stages_text(ctx: CompileContext) -> str:
    if ctx.config.virtual_stages == 1:
        return f"--stages {ctx.config.stages}"
    return f"--stages {ctx.config.stages} x --virtual-stages {ctx.config.virtual_stages} = {ctx.num_stages} stages"


def assign_stages(gm: fx.GraphModule, compute_order: list[str], cuts: list[int], K: int) -> None:
    """Write ppc.stage (and ppc.position) for the partition given by ``cuts``."""
    position = {name: i for i, name in enumerate(compute_order)}
    bounds = [0, *cuts, len(compute_order)]
    for node in gm.graph.nodes:
        node.meta["ppc.stage"] = None
        if node.name in position:
            pos = position[node.name]
            node.meta["ppc.position"] = pos
            node.meta["ppc.stage"] = next(s for s in range(K) if bounds[s] <= pos < bounds[s + 1])
        elif node.op == "output":
            node.meta["ppc.stage"] = K - 1


def is_free(node: fx.Node, free: set[str], written: set[str] = frozenset()) -> bool:
    """Placeholders, get_attr, non-tensor values computed only from those, and tensors each stage
    makes for less than a message would cost (:func:`_made_again`: a buffer's slice, a mask from
    the inputs); not an effect (a buffer's rebinding: ``tracer.is_effect``), which runs where the
    model runs it. Each stage that uses a free node makes it again, so it is never sent."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if is_effect(node) or node.op == "output":
        return False
    if node.meta.get("ppc.kind") == "tensor":
        return _made_again(node, free, written)
    if node.meta.get("ppc.kind") not in ("other", "none"):
        return False
    return all(n.name in free for n in node.all_input_nodes)


# Operations that read each element of their inputs once or make a tensor from sizes alone:
# on any device, making the result again costs less than sending its bytes.
_CHEAP_METHODS = VIEW_METHODS | {
    "reshape_as", "expand_as", "contiguous", "detach",
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "bool", "long", "int",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or",
    "masked_fill", "where", "tril", "triu", "cumsum", "clamp", "neg", "abs", "sum", "any", "all",
}  # fmt: skip
_CHEAP_FUNCTIONS = frozenset(
    {
        operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
        operator.mod, operator.pow, operator.neg, operator.invert, operator.and_, operator.or_,
        operator.xor, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
        torch.arange, torch.ones, torch.zeros, torch.full, torch.eye, torch.ones_like, torch.zeros_like,
        torch.full_like, torch.tril, torch.triu, torch.where, torch.logical_not, torch.logical_and,
        torch.logical_or, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.cumsum,
        torch.clamp, torch.masked_fill, torch.tensor, torch.as_tensor, torch.scalar_tensor,
    }
)  # fmt: skip


def _made_again(node: fx.Node, free: set[str], written: set[str]) -> bool:
    """A tensor without a gradient that a cheap operation (views, casts, comparisons, element-wise
    arithmetic, ``torch.arange`` and ``torch.ones`` from sizes) makes from free values alone: the
    model's inputs, buffers forward never writes (``written``), sizes and earlier such tensors.
    LLaMA's ``self.freqs[:t]``, BERT's ``(1.0 - mask[:, None, None, :]) * -10000.0`` and a causal
    mask from ``torch.ones(T, T).triu(1)`` are read by every layer: each stage makes them itself,
    where they would otherwise be sent to every later stage on each micro-batch."""
    cheap = (node.op == "call_method" and node.target in _CHEAP_METHODS) or (
        node.op == "call_function" and node.target in _CHEAP_FUNCTIONS
    )
    if not cheap or node.meta.get("ppc.requires_grad"):
        return False
    if any(user.op == "output" for user in node.users):
        return False  # a value the model returns is the last stage's to make
    for dep in node.all_input_nodes:
        if dep.name not in free:
            return False
        # A parameter read under no_grad stays on the stage that owns it; a buffer or an input
        # forward writes changes, where a stage's own copy would not.
        if dep.op == "get_attr" and (dep.meta.get("ppc.requires_grad") or dep.target in written):
            return False
        if dep.op == "placeholder" and dep.name in written:
            return False
    return True


def compute_order(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes a stage runs, in topological order; free nodes are left out."""
    # Buffers by name (their writes and rebindings) and the inputs forward writes, by node name.
    written = set()
    for node in gm.graph.nodes:
        if (root := written_root(gm, node)) is not None:
            written.add(root.name)
        written.update(written_buffers(gm, node))
    free: set[str] = set()
    order = []
    for node in gm.graph.nodes:
        if is_free(node, free, written):
            free.add(node.name)
        elif node.op != "output":
            order.append(node)
    return order


def partition_problem(gm, ctx, order, weight=None):
    """Per-position compute times, the values that may cross cuts, and the forbidden cut positions.

    Each crossing value weighs its link occupancy (activation forward, gradient back), or
    ``weight(node)`` per direction when given."""
    position = {node.name: i for i, node in enumerate(order)}
    last = len(order) - 1
    times = [node.meta["ppc.cost"].time for node in order]
    values, forbidden = [], set()
    for node in order:
        p = position[node.name]
        users = sorted({position.get(u.name, last) for u in node.users})  # the output node sits at the end
        users = [u for u in users if u > p]
        if not users:
            continue
        if node.meta["ppc.kind"] != "tensor":
            # An int from a shape is computed again where it is used (ppc.value); a value the sizes
            # do not fix (a device, a tuple holding tensors) cannot cross.
            if "ppc.value" not in node.meta:
                forbidden.update(range(p + 1, users[-1] + 1))
            continue
        nbytes = node.meta["ppc.nbytes"]
        t = weight(node) if weight else ctx.profile.transfer_occupancy(nbytes)
        if node.meta["ppc.requires_grad"]:
            t *= 2
        values.append(CrossingValue(p, tuple(users), t))
    for _, first, written in buffer_spans(gm, order):
        forbidden.update(range(position[first.name] + 1, position[written.name] + 1))
    for view, write in view_spans(gm, order):
        forbidden.update(range(position[view.name] + 1, position[write.name] + 1))
    for _, lookup, last_lookup in renormed_spans(gm, order):
        forbidden.update(range(position[lookup.name] + 1, position[last_lookup.name] + 1))
    loss = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    trains = ctx is None or ctx.config.trains
    if trains and isinstance(loss, fx.Node) and loss.name in position:
        # What forward computes after the loss (metrics returned beside it, a queue rebound) is
        # cheap, and a stage of its own would leave the loss, which backward starts from, off the last.
        forbidden.update(range(position[loss.name] + 1, last + 1))
    return times, values, forbidden


def renormed_spans(gm: fx.GraphModule, order: list[fx.Node]) -> list[tuple[str, fx.Node, fx.Node]]:
    """Each weight of an ``nn.Embedding(max_norm=...)`` looked up more than once (the embedding
    called twice, as T5 shares one), by name, with its first and last lookup. No cut may fall
    between them: each lookup rescales the rows it reads in place, and a copy of the weight on
    another rank would never see the rescaling."""
    return [
        (weight, lookups[0], lookups[-1])
        for weight, (lookups, _) in _renormed_uses(gm, order).items()
        if len(lookups) > 1
    ]


def _renormed_uses(
    gm: fx.GraphModule, order: list[fx.Node]
) -> dict[str, tuple[list[fx.Node], list[fx.Node]]]:
    """Each weight of an ``nn.Embedding(max_norm=...)`` by name: (the nodes that look it up through
    such an embedding, the other nodes that read it: a head tied to it)."""
    renormed = {
        id(m.weight): name + ".weight"
        for name, m in gm.named_modules(remove_duplicate=False)
        if isinstance(m, torch.nn.Embedding) and m.max_norm is not None
    }
    if not renormed:
        return {}
    parameters = {name: id(p) for name, p in gm.named_parameters(remove_duplicate=False)}
    uses: dict[str, tuple[list[fx.Node], list[fx.Node]]] = {}
    for node in order:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            held = {id(p) for p in module.parameters()}
            lookup = isinstance(module, torch.nn.Embedding) and module.max_norm is not None
        else:
            held = {parameters[n.target] for n in node.all_input_nodes if n.target in parameters}
            lookup = False
        for weight in held & renormed.keys():
            lookups, others = uses.setdefault(renormed[weight], ([], []))
            (lookups if lookup else others).append(node)
    return uses


def _refuse_renormed_weights_read_elsewhere(
    gm: fx.GraphModule, ctx: CompileContext, order: list[fx.Node]
) -> None:
    """A max_norm embedding's weight that another node reads too (an LM head tied to it): with
    micro-batches, a later micro-batch's lookup rescales rows under an earlier one's head, which
    read them before (and in backward needs them as they were), where the model's one forward
    rescales every row of the batch before the head reads any."""
    for weight, (_, others) in _renormed_uses(gm, order).items():
        if others:
            owner = gm.get_submodule(weight.rpartition(".")[0])
            raise CompileError(
                f"{ctx.ref}: `{weight}` belongs to an nn.Embedding with max_norm={owner.max_norm}, which "
                f"rescales it in place at each lookup, and `{others[0].name}` reads it too (a tied head): "
                "each micro-batch's lookup would rescale rows under the micro-batches before it; untie them "
                "or drop max_norm"
            )


def view_spans(gm: fx.GraphModule, order: list[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """Each view taken before an in-place write to its tensor (``head = acc[:, :4]; acc *= 0.5``)
    and read after it, with that write. No cut may fall between them: a stage sends its values
    after its forward has run, so a view sent from the stage that writes carries the write, where
    a view sent before it would arrive unchanged."""
    position = {node.name: i for i, node in enumerate(order)}
    views: dict[str, list[fx.Node]] = {}
    for node in order:
        if is_view(node) or node.meta.get("ppc.view_of") is not None:
            views.setdefault(storage_of(gm, node).name, []).append(node)
    spans = []
    for write in order:
        root = written_root(gm, write)
        for view in views.get(root.name, []) if root is not None else []:
            at = position[write.name]
            if position[view.name] < at and any(position.get(u.name, -1) > at for u in view.users):
                spans.append((view, write))
    return spans


_HELD_NOTE = "so each micro-batch reads what the one before it wrote"


def _held_together(gm: fx.GraphModule, order: list[fx.Node]) -> list[str]:
    """For the report: each buffer whose reads and writes keep nodes from being cut apart."""
    position = {node.name: i for i, node in enumerate(order)}
    notes = []
    for buffer, first, last in buffer_spans(gm, order):
        between = position[last.name] - position[first.name]
        if between > 1:  # a read and its write side by side (self.steps += 1) hold back nothing
            if written_buffers(gm, last):
                last_does = "written by"
            elif last.op == "call_module":
                last_does = "read by its module's call"
            else:
                last_does = "read after its write by"
            notes.append(
                f"buffer `{buffer}` is read by `{first.name}` and {last_does} `{last.name}` {between} nodes "
                f"later: no cut falls between them, {_HELD_NOTE}"
            )
    for weight, first, last in renormed_spans(gm, order):
        notes.append(
            f"`{weight}` belongs to an nn.Embedding with max_norm, which rescales it in place at each "
            f"lookup; it is used by `{first.name}` and `{last.name}` "
            f"{position[last.name] - position[first.name]} nodes later: no cut falls between them, "
            f"{_HELD_NOTE}"
        )
    return notes


def buffer_spans(gm: fx.GraphModule, order: list[fx.Node]) -> list[tuple[str, fx.Node, fx.Node]]:
    """Each buffer (or parameter) the model rebinds (``self.ema = ...``) or writes in place
    (``self.queue[0] = k``), with the first node of ``order`` that reads it and the last that writes
    it or calls a module holding it. No cut may fall between them: the stage holding the buffer
    sees its own write at the next micro-batch, as the model would, where a stage on another rank
    that read it first would keep its own copy, never written; and a module's call reads its
    tensors implicitly, so one written before it must be written on its stage."""
    position = {node.name: i for i, node in enumerate(order)}
    written: dict[str, list[fx.Node]] = {}  # the writes, then the calls of modules holding it
    for node in order:
        for buffer in written_buffers(gm, node):
            written.setdefault(buffer, []).append(node)
    # Reads through a get_attr after the last write read the write's result (order_mutations):
    # that value is sent like any other. A module's call cannot be pointed at it.
    read = {buffer: [] for buffer in written}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in read:
            read[node.target] += [u for u in node.users if u.name in position]
    for node in order:
        if node.op == "call_module":
            for buffer in written:
                if buffer.startswith(node.target + "."):
                    written[buffer].append(node)
    # A read after the last write is a layer's buffer read after the layer updated it, which
    # order_mutations points at a copy taken just after the call: that copy stays with it.
    spans = []
    for buffer, nodes in written.items():
        first = min(nodes + read[buffer], key=lambda n: position[n.name])
        spans.append((buffer, first, max(nodes + read[buffer], key=lambda n: position[n.name])))
    return spans


def segment_costs(
    times: Sequence[float], values: Sequence[CrossingValue], forbidden: set[int], send_call: float = 0.0
) -> torch.Tensor:
    """cost[i, j]: the time of a stage running positions i..j; inf where j < i or a cut is illegal.
    ``send_call``: what one message's send costs its sender, paid once per cut the stage borders."""
    n = len(times)
    cost = span_sums(torch.tensor([0.0, *times], dtype=torch.float64))
    cost[1:, :] += send_call  # a cut before the stage: it sends its gradients back
    cost[:, : n - 1] += send_call  # a cut after it: it sends its activations on
    entering = [v.transfer_time for v in values]
    leaving = [v.transfer_time if v.leaving_time is None else v.leaving_time for v in values]
    cost += crossing_sums(n, values, entering, leaving)
    cost[torch.ones(n, n, dtype=torch.bool).tril(-1)] = torch.inf
    return forbid_cuts(cost, forbidden)


def stage_cost_matrix(ctx: CompileContext, order, times, values, forbidden) -> torch.Tensor:
    """What the partitioner weighs for ``partition_problem``'s answer: every segment's compute,
    crossings and send calls, and each divided layer's join where a cut divides it."""
    return segment_costs(times, values + join_prices(order), forbidden, ctx.profile.send_overhead)


def forbid_cuts(cost: torch.Tensor, cuts) -> torch.Tensor:
    """``cost`` with no stage starting at any of ``cuts`` (nor ending just before one)."""
    for cut in cuts:
        cost[cut, :] = torch.inf
        cost[:, cut - 1] = torch.inf
    return cost


def divided_layer_spans(order: Sequence[fx.Node]) -> list[tuple[int, int, fx.Node]]:
    """(first piece's position, the join's position, the join) of each divided layer in ``order``."""
    position = {node.name: i for i, node in enumerate(order)}
    spans = []
    for node in order:
        if "ppc.divided" in node.meta:
            spans.append((position[node.meta["ppc.divided"].pieces[0]], position[node.name], node))
    return spans


def join_prices(order: Sequence[fx.Node]) -> list[CrossingValue]:
    """Per divided layer, its join's copy charged to a stage that starts among its pieces and holds
    the join (``divide_layers``): a layer the cuts leave whole is not joined at all."""
    return [
        CrossingValue(first, (join,), node.meta["ppc.divided"].join_cost.time, leaving_time=0.0)
        for first, join, node in divided_layer_spans(order)
    ]


def cuts_inside_divided_layers(order: Sequence[fx.Node]) -> set[int]:
    return {cut for first, join, _ in divided_layer_spans(order) for cut in range(first + 1, join + 1)}


def crossing_sums(
    n: int, values: Sequence[CrossingValue], entering: Sequence[float], leaving: Sequence[float]
) -> torch.Tensor:
    """For every segment (i, j): the sum of ``entering[v]`` over the values that enter it (made
    before it, used in it) and of ``leaving[v]`` over those that leave it (made in it, used after it)."""
    rectangles = []
    for v, enter, leave in zip(values, entering, leaving):
        previous = v.producer
        for c in v.consumers:
            # Enters stage [i, j] when it starts after the producer and its first use at or after i is c <= j.
            rectangles.append((previous + 1, c, c, n - 1, enter))
            previous = c
        # Leaves stage [i, j] when the stage holds the producer and some use comes after j.
        rectangles.append((0, v.producer, v.producer, v.consumers[-1] - 1, leave))
    return rectangle_sums(n, rectangles)


def rectangle_sums(n: int, rectangles) -> torch.Tensor:
    """The n x n matrix that sums ``w`` over each (i0, i1, j0, j1, w): rows i0..i1, columns j0..j1,
    inclusive, from a 2-D difference array."""
    rows, cols, weights = [], [], []
    for i0, i1, j0, j1, w in rectangles:
        rows.extend((i0, i1 + 1, i0, i1 + 1))
        cols.extend((j0, j0, j1 + 1, j1 + 1))
        weights.extend((w, -w, -w, w))
    diff = torch.zeros((n + 1, n + 1), dtype=torch.float64)
    if rows:
        index = (torch.tensor(rows), torch.tensor(cols))
        diff.index_put_(index, torch.tensor(weights, dtype=torch.float64), accumulate=True)
    return torch.cumsum(torch.cumsum(diff, 0), 1)[:n, :n]


def solve_partition(cost: torch.Tensor, K: int, fits=None) -> list[int] | None:
    """Cut positions (the first index of stages 1..K-1) minimising the max stage cost, then the
    sum of squares among optimal partitions. ``fits(k)``, when given, is a boolean matrix of the
    (i, j) segments stage k may hold (its memory budget). None when no partition is feasible.

    Dynamic programming over stage ends, each step over a band of stage starts: no stage of an
    optimal partition costs more than a partition found without search (``_upper_bound``), so
    only the segments within that cost are searched, about 2n/K wide where the nodes are many
    and even: GPT-3's 3,850 nodes into 16 stages search a tenth of the n x n segments.
    """
    n = cost.shape[0]
    if K > n:
        return None
    # Phase 1: the optimal bottleneck. Where the budget rules out the partition that bounds the
    # band, the bound without the budget is a guess, doubled while the bottleneck exceeds it (a
    # bottleneck within the bound is the optimum: every stage as cheap lies in the band).
    upper = _upper_bound(cost, K, fits)
    if not math.isfinite(upper) and fits is not None:
        upper = _upper_bound(cost, K, None)
    for attempt in itertools.count():
        band = _Band.within(cost, upper, fits)
        best = band.first_stage()  # best[j]: the slowest of the stages so far, the last ending at j
        for k in range(1, K):
            best = torch.maximum(band.before(best), band.stage(k)).amin(dim=1)
        bottleneck = float(best[n - 1])
        if bottleneck <= upper or not math.isfinite(upper):
            break
        if attempt == 0 and fits is not None and not _any_partition_fits(cost, K, fits):
            return None  # no wider band can help: settled in boolean steps, not the whole search
        upper = upper * 2 if attempt < 2 else math.inf  # the whole matrix at last
    if not math.isfinite(bottleneck):
        return None

    # Phase 2: among stages no slower than the bottleneck, the smallest sum of squares.
    def allowed(c: torch.Tensor) -> torch.Tensor:
        return torch.where(c <= bottleneck * (1 + 1e-12), c**2, torch.inf)

    total = allowed(band.first_stage())
    choices = []
    for k in range(1, K):
        total, choice = (band.before(total) + allowed(band.stage(k))).min(dim=1)
        choices.append(band.starts.gather(1, choice[:, None])[:, 0])
    if not math.isfinite(float(total[n - 1])):
        return None
    cuts, end = [], n - 1
    for choice in reversed(choices):
        start = int(choice[end])
        cuts.append(start)
        end = start - 1
    return sorted(cuts)


@dataclass(frozen=True)
class _Band:
    """The segments ``solve_partition`` searches: row j of each n x w matrix holds those ending at
    j, by start, from the earliest start any segment within the bound has up to j."""

    cost: torch.Tensor
    fits: object  # fits(k) as solve_partition takes it, or None
    starts: torch.Tensor  # the segment's first position (0 where ``previous`` is -1)
    ends: torch.Tensor
    previous: torch.Tensor  # the position before the start; -1 where the start would be 0 or less

    @staticmethod
    def within(cost: torch.Tensor, upper: float, fits) -> _Band:
        """The band of the segments costing at most ``upper`` (every finite one where it is inf)."""
        n = cost.shape[0]
        inside = (cost <= upper) if math.isfinite(upper) else torch.isfinite(cost)
        inside |= torch.eye(n, dtype=torch.bool)
        earliest = inside.int().argmax(dim=0)  # the first start within the bound, per end
        width = int((torch.arange(n) - earliest).max()) + 1
        ends = torch.arange(n)[:, None].expand(n, width)
        starts = ends - torch.arange(width - 1, -1, -1)[None, :]
        previous = torch.where(starts >= 1, starts - 1, -1)
        return _Band(cost, fits, starts.clamp(min=0), ends, previous)

    def first_stage(self) -> torch.Tensor:
        """Stage 0's cost ending at each position (it starts at 0)."""
        return _stage_cost(self.cost, self.fits, 0, 0, torch.arange(self.cost.shape[0]))

    def stage(self, k: int) -> torch.Tensor:
        """Stage k >= 1's cost for each segment of the band; inf where it would start at 0."""
        cost = _stage_cost(self.cost, self.fits, k, self.starts, self.ends)
        return torch.where(self.previous >= 0, cost, torch.inf)

    def before(self, values: torch.Tensor) -> torch.Tensor:
        """values[i - 1] for each segment's start i: what the stages before it reached."""
        return torch.where(self.previous >= 0, values[self.previous.clamp(min=0)], torch.inf)


def _stage_cost(cost: torch.Tensor, fits, k: int, rows, cols) -> torch.Tensor:
    c = cost[rows, cols]
    return c if fits is None else torch.where(fits(k)[rows, cols], c, torch.inf)


def _upper_bound(cost: torch.Tensor, K: int, fits) -> float:
    """The slowest stage of one partition found without search: a stage from the first node to
    node j stands for the work done by j, and cut k falls where that passes k/K of the whole, at
    the nearest position a stage may start. inf where that partition is not allowed."""
    n = cost.shape[0]
    reached = torch.cummax(torch.nan_to_num(cost[0], posinf=0.0), 0).values
    legal = torch.isfinite(cost[:, n - 1]).nonzero()[:, 0]  # where a stage may start
    cuts = [0]
    for k in range(1, K):
        target = int(torch.searchsorted(reached, reached[-1] * k / K))
        after = legal[legal > cuts[-1]]
        if len(after) == 0:
            return math.inf
        cuts.append(int(after[torch.argmin((after - target).abs())]))
    cuts.append(n)
    return max(float(_stage_cost(cost, fits, k, cuts[k], cuts[k + 1] - 1)) for k in range(K))


def _any_partition_fits(cost: torch.Tensor, K: int, fits) -> bool:
    """Whether any cut into K stages has every stage within ``fits`` (and ``cost`` finite)."""
    finite = torch.isfinite(cost)
    reached = finite[0] & fits(0)[0]  # reached[j]: stages so far can end at j
    for k in range(1, K):
        reached = (reached[:-1, None] & finite[1:, :] & fits(k)[1:, :]).any(dim=0)
    return bool(reached[-1])


def exists_in_segment(n: int, items) -> torch.Tensor:
    """sum of weights of the items with a position inside segment [i, j], for every (i, j).

    ``items`` is (sorted positions, weight) pairs: a parameter and the nodes that use it, or a
    saved tensor and the nodes that save it; each counts once per segment however often it occurs.
    """
    rectangles = []
    for positions, w in items:
        previous = -1
        for c in positions:
            # The first position at or after i is c: the segment holds it when j >= c.
            rectangles.append((previous + 1, c, c, n - 1, w))
            previous = c
    return rectangle_sums(n, rectangles)


@dataclass
class SegmentMemory:
    """A stage's peak memory part by part, as ``ppcompile.memory.StageMemory`` counts it, for every
    segment (i, j) of the compute order that a stage may hold."""

    fixed: torch.Tensor  # parameters, gradients, optimizer state, buffers, transfer buffers
    activations: torch.Tensor  # saved for backward, one micro-batch
    recompute: torch.Tensor | float  # the largest recomputed region's activations
    working: torch.Tensor
    update: torch.Tensor  # the optimizer step's temporaries

    def total(self, live_microbatches: int) -> torch.Tensor:
        held = self.activations * live_microbatches + self.recompute + self.working
        return self.fixed + torch.maximum(held, self.update)

    def fits(self, budget: float, live_microbatches) -> dict[int, torch.Tensor]:
        """For each number of live micro-batches, whether ``total`` is within ``budget``: the same
        comparison, arranged so that each count costs one product and one comparison."""
        step_fits = self.fixed + self.update <= budget
        room = budget - self.fixed - self.recompute - self.working
        return {live: step_fits & (self.activations * live <= room) for live in set(live_microbatches)}


def memory_fits(gm: fx.GraphModule, ctx: CompileContext, order: list[fx.Node], budget: int):
    """fits(k): which segments stage k can hold within ``budget`` without recomputation."""
    within = segment_memory(gm, ctx, order).fits(budget, ctx.live_microbatches)
    return lambda k: within[ctx.live_microbatches[k]]


def segment_memory(gm: fx.GraphModule, ctx: CompileContext, order: list[fx.Node]) -> SegmentMemory:
    """Every segment's peak memory without recomputation, by ``plan_memory.stage_memory``'s rules.

    Parameters and buffers count once per segment that uses them; a saved tensor's storage once
    per segment that saves it (through views, as far as the segment holds them: a view received
    from another stage is a storage of its own there); transfer buffers once per value entering
    and once per value leaving. One thing a segment alone cannot know: a value sent to two later
    stages has send buffers for each on its producer's rank, where this counts them once, so
    plan_memory checks the cuts it is given against its own count."""
    n = len(order)
    nodes = {node.name: node for node in gm.graph.nodes}
    position = {node.name: i for i, node in enumerate(order)}
    optimizer = ctx.config.optimizer
    held: dict[int, tuple[list[int], float, float]] = {}  # id -> (users, bytes held, trained bytes)
    largest_trained = torch.zeros(n, dtype=torch.float64)
    temp = torch.zeros(n + 1, dtype=torch.float64)
    working = torch.zeros(n, dtype=torch.float64)
    items = []
    for i, node in enumerate(order):
        for t, role in held_tensors(ctx.spec.module, node):
            nbytes = t.numel() * t.element_size()
            trained = role == "trained"
            weight = nbytes * parameter_bytes_held(optimizer) if trained else nbytes
            held.setdefault(id(t), ([], weight, nbytes if trained else 0.0))[0].append(i)
            if trained:
                largest_trained[i] = max(float(largest_trained[i]), nbytes)
        temp[i + 1] = node.meta["ppc.cost"].saved_temp_bytes
        working[i] = working_bytes(
            nodes, node, accumulated_gradient_bytes(ctx.spec.module, node, ctx.config.microbatches)
        )
        for name in saved_values(nodes, node):
            items += storage_items(nodes, position, name, i)
    static = exists_in_segment(n, [(sorted(set(users)), w) for users, w, _ in held.values()])
    activations = storage_union_bytes(n, nodes, items) + span_sums(temp)
    # The step's temporaries scale with every trained parameter (at once) or the largest (one at a time).
    at_once = steps_every_parameter_at_once(ctx.profile.name, ctx.profiled_on)
    per_byte = optimizer_step_bytes(optimizer, [1.0], at_once)
    if at_once:
        update = (
            exists_in_segment(n, [(sorted(set(users)), p) for users, _, p in held.values() if p]) * per_byte
        )
    else:
        update = range_max(largest_trained) * per_byte
    return SegmentMemory(
        fixed=static + transfer_buffers(gm, ctx, order),
        activations=activations,
        recompute=0.0,
        working=range_max(working),
        update=update,
    )


def transfer_buffers(gm: fx.GraphModule, ctx: CompileContext, order: list[fx.Node]) -> torch.Tensor:
    """Every segment's receive and send buffers (``ppcompile.memory``)."""
    M = ctx.config.microbatches
    _, values, _ = partition_problem(gm, ctx, order, weight=lambda node: 0.0)
    tensors = [order[v.producer] for v in values]
    entering = [receive_buffer_bytes(t.meta["ppc.nbytes"], t.meta["ppc.requires_grad"], M) for t in tensors]
    leaving = [send_buffer_bytes(t.meta["ppc.nbytes"], t.meta["ppc.requires_grad"], M) for t in tensors]
    return crossing_sums(len(order), values, entering, leaving)


def storage_items(nodes: dict[str, fx.Node], position: dict[str, int], name: str, at: int) -> list[tuple]:
    """Where value ``name``, kept at position ``at``, lives for a stage holding ``at``: items
    (root, lo, hi, at) saying that a stage starting anywhere in lo..hi counts the storage of node
    ``root`` (``storage_root`` with the stage as ``own``: the walk through views stops at the
    first node made before the stage starts). Parameters and buffers give none."""
    items = []
    node, hi = nodes[name], at
    while hi >= 0:
        view_of = node.meta.get("ppc.view_of")
        if view_of and node.name not in position:  # a view each stage makes itself: a buffer's slice
            node = nodes[view_of]
            continue
        # A view made before the stage starts arrives as a storage of its own; the end of the
        # chain is the storage wherever the stage starts.
        lo = position.get(node.name, -1) + 1 if view_of else 0
        if node.op != "get_attr" and lo <= hi:
            items.append((node.name, lo, hi, at))
        if not view_of:
            break
        hi = min(hi, position.get(node.name, -1))  # stages starting at or before it walk on
        node = nodes[view_of]
    return items


def storage_union_bytes(n: int, nodes: dict[str, fx.Node], items: list[tuple]) -> torch.Tensor:
    """For every segment (i, j): the bytes of the distinct storages the ``storage_items`` place in it.

    A root counts once where any of its items has lo <= i <= hi and at <= j: for each band of
    starts the same items cover, from the earliest ``at`` among them on."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for root, lo, hi, at in items:
        spans.setdefault(root, []).append((lo, hi, at))
    rectangles = []
    for root, found in spans.items():
        nbytes = float(nodes[root].meta.get("ppc.nbytes", 0))
        if not nbytes:
            continue
        bounds = sorted({lo for lo, _, _ in found} | {hi + 1 for _, hi, _ in found})
        for first, after in itertools.pairwise(bounds):
            covering = [at for lo, hi, at in found if lo <= first <= hi]
            if covering:
                rectangles.append((first, after - 1, min(covering), n - 1, nbytes))
    return rectangle_sums(n, rectangles)


def span_sums(values: torch.Tensor) -> torch.Tensor:
    """For every segment (i, j): values[i + 1] + ... + values[j + 1] (``values`` has n + 1 entries, the first unused)."""
    prefix = torch.cumsum(values, 0)
    return prefix[None, 1:] - prefix[:-1, None]


def range_max(values: torch.Tensor) -> torch.Tensor:
    """For every segment (i, j): the largest of values[i..j]."""
    n = len(values)
    result = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        result[i, i:] = torch.cummax(values[i:], 0).values
    return result


def best_compute_balance(gm: fx.GraphModule, K: int) -> float:
    """The slowest over the mean stage, in forward + backward time alone, of the best cut of
    ``gm``'s costed nodes into K stages: how close to even any partition can come, whatever its
    costs of communication, given how the time is lumped into nodes and where cuts are legal.

    At K=4 each of gpt_mini's heaviest nodes (a block's linear layers) is about a fifth of a mean
    stage: no single node comes near a stage, yet no cut of its nodes gets below about 1.05.
    """
    order = compute_order(gm)
    times, _, forbidden = partition_problem(gm, None, order, weight=lambda node: 0.0)
    floor = compute_floor(times, forbidden, K)
    return math.inf if floor is None else max(floor) * K / sum(floor)


def compute_floor(times: Sequence[float], forbidden: set[int], K: int) -> list[float] | None:
    """Per stage, the forward + backward time of a cut into K stages whose slowest stage computes
    least, communication left out: no partition's slowest stage computes less.

    Without communication a stage's time only grows as it takes more nodes, so the least
    bottleneck is found by bisection, each guess checked by filling stages greedily, in
    O(K log n) per guess where ``solve_partition`` spends O(K n^2): GPT-3's 3,850 nodes in
    milliseconds, not seconds.

    >>> compute_floor([1.0, 1.0, 2.0, 1.0, 1.0], set(), 3)
    [2.0, 2.0, 2.0]
    """
    n = len(times)
    # Stages start at legal cuts only: the nodes between two of them are one block.
    starts = [0, *(c for c in range(1, n) if c not in forbidden)]
    if len(starts) < K:
        return None
    prefix = [0.0, *itertools.accumulate(times)]
    at = [prefix[s] for s in [*starts, n]]  # the time before each block, and the total

    def fill(limit: float) -> list[int]:
        """Indices of the blocks that start stages, each stage as many blocks as fit in ``limit``."""
        firsts, block = [], 0
        while block < len(starts):
            firsts.append(block)
            block = max(block + 1, bisect.bisect_right(at, at[block] + limit) - 1)
        return firsts

    low = max(b - a for a, b in itertools.pairwise(at))
    high = at[-1]
    for _ in range(100):
        if high - low <= 1e-12 * high:
            break
        middle = (low + high) / 2
        if len(fill(middle)) <= K:
            high = middle
        else:
            low = middle
    firsts = fill(high)
    # Fewer stages than K: split blocks off the last stages that hold more than one (never slower).
    for stage in range(len(firsts) - 1, -1, -1):
        end = firsts[stage + 1] if stage + 1 < len(firsts) else len(starts)
        while len(firsts) < K and end - firsts[stage] > 1:
            end -= 1
            firsts.insert(stage + 1, end)
    bounds = [at[b] for b in firsts] + [at[-1]]
    return [b - a for a, b in itertools.pairwise(bounds)]


def stage_times_for(cost: torch.Tensor, cuts: Sequence[int]) -> list[float]:
    bounds = [0, *cuts, cost.shape[0]]
    return [float(cost[bounds[s], bounds[s + 1] - 1]) for s in range(len(bounds) - 1)]


_LAYER = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def layer_of(node: fx.Node) -> tuple[str, int] | None:
    path = (
        node.target
        if node.op == "call_module"
        else next(reversed(node.meta.get("nn_module_stack") or {}), "")
    )
    match = _LAYER.match(path or "")
    return (match.group(1), int(match.group(2))) if match else None


def even_layer_count(order: Sequence[fx.Node]) -> int:
    layers = {}
    for node in order:
        found = layer_of(node)
        if found:
            layers.setdefault(found[0], set()).add(found[1])
    return max((len(v) for v in layers.values()), default=0)


def even_layer_cuts(order: Sequence[fx.Node], K: int) -> list[int] | None:
    """The split users make by hand: the repeated layers (``h.0``, ``h.1``, ...) dealt out evenly,
    what comes before them on the first stage and what comes after on the last."""
    layers: dict[str, set[int]] = {}
    for node in order:
        found = layer_of(node)
        if found:
            layers.setdefault(found[0], set()).add(found[1])
    if not layers:
        return None
    prefix = max(layers, key=lambda p: len(layers[p]))
    count = len(layers[prefix])
    if count < K:
        return None
    # Stage k starts at layer floor(k * L / K), as Megatron-LM and torchtitan assign layers.
    starts = [k * count // K for k in range(1, K)]
    cuts = []
    for start in starts:
        for pos, node in enumerate(order):
            found = layer_of(node)
            if found and found[0] == prefix and found[1] >= start:
                cuts.append(pos)
                break
    return cuts if len(set(cuts)) == K - 1 else None
