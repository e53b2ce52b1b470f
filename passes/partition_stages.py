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
a value that cannot be sent (an int from ``x.size()``, a tuple) is live across the cut.

Placeholders, parameters and non-tensor values computed only from them are not placed:
every stage that uses one loads or recomputes it.

Keys written on each node:
  ppc.stage        stage index of a compute node (and of the output node); None for free nodes
  ppc.position     index in the compute order (compute nodes)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from ppcompile.context import CompileContext, Partition
from ppcompile.errors import CompileError
from ppcompile.memory import (
    OPTIMIZER_STATE_FACTOR,
    OPTIMIZER_STEP_TEMPORARIES,
    allocated_bytes,
    held_tensors,
    steps_every_parameter_at_once,
    storage_root,
)


@dataclass(frozen=True)
class CrossingValue:
    """A value made at ``producer`` and used at ``consumers`` (positions in the compute order)."""

    producer: int
    consumers: tuple[int, ...]
    transfer_time: float  # seconds it occupies the link, forward and its gradient back


def partition_stages(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    K = ctx.num_stages
    if K < 1:
        raise CompileError(f"--stages must be at least 1, got {K}")
    order = compute_order(gm)
    times, values, forbidden = _problem(gm, ctx, order)
    legal_cuts = len(order) - 1 - len(forbidden)
    if K - 1 > legal_cuts:
        raise CompileError(
            f"{_stages_text(ctx)} needs {K - 1} cuts but {ctx.ref} has only {legal_cuts} places it can be cut "
            f"({len(order)} compute nodes); use {legal_cuts + 1} stages or fewer in all"
        )
    cost = segment_costs(times, values, forbidden, ctx.profile.send_overhead)
    fitting = None
    if ctx.config.memory_per_device is not None:
        # The best cuts that fit without recomputation; plan_memory weighs them against the fastest
        # cuts with layers recomputed, and keeps whichever gives the faster slowest stage.
        fitting = solve_partition(cost, K, memory_fits(gm, ctx, order, ctx.config.memory_per_device))
    cuts = solve_partition(cost, K)
    if cuts is None:
        raise CompileError(f"no partition of {ctx.ref} into {K} stages exists; use fewer stages")
    ctx.partition = Partition(
        cut_positions=list(cuts),
        stage_times=stage_times_for(cost, cuts),
        compute_order=[n.name for n in order],
    )
    if fitting is not None:
        ctx.partition.fitting_cuts = list(fitting)
        ctx.partition.fitting_times = stage_times_for(cost, fitting)
    assign_stages(gm, ctx.partition.compute_order, ctx.partition.cut_positions, K)
    even = even_layer_cuts(order, K)
    if even is not None:
        ctx.partition.even_split_times = stage_times_for(cost, even)
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


def is_free(node: fx.Node, free: set[str]) -> bool:
    """Placeholders, get_attr, and non-tensor values computed only from those."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op == "output" or node.meta.get("ppc.kind") not in ("other", "none"):
        return False
    return all(n.name in free for n in node.all_input_nodes)


def compute_order(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes a stage runs, in topological order; free nodes are left out."""
    free: set[str] = set()
    order = []
    for node in gm.graph.nodes:
        if is_free(node, free):
            free.add(node.name)
        elif node.op != "output":
            order.append(node)
    return order


def _problem(gm, ctx, order, weight=None):
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
            forbidden.update(range(p + 1, users[-1] + 1))
            continue
        nbytes = node.meta["ppc.nbytes"]
        t = weight(node) if weight else ctx.profile.transfer_occupancy(nbytes)
        if node.meta["ppc.requires_grad"]:
            t *= 2
        values.append(CrossingValue(p, tuple(users), t))
    return times, values, forbidden


def segment_costs(
    times: Sequence[float], values: Sequence[CrossingValue], forbidden: set[int], send_call: float = 0.0
) -> torch.Tensor:
    """cost[i, j]: the time of a stage running positions i..j; inf where j < i or a cut is illegal.
    ``send_call``: what one message's send costs its sender, paid once per cut the stage borders."""
    n = len(times)
    prefix = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.tensor(times, dtype=torch.float64), 0)]
    )
    cost = prefix[None, 1:] - prefix[:-1, None]
    cost[1:, :] += send_call  # a cut before the stage: it sends its gradients back
    cost[:, : n - 1] += send_call  # a cut after it: it sends its activations on
    # Each crossing value adds its transfer time on rectangles of (i, j); sum them with a 2-D difference array.
    rows, cols, weights = [], [], []

    def add(i0, i1, j0, j1, w):  # inclusive ranges
        rows.extend((i0, i1 + 1, i0, i1 + 1))
        cols.extend((j0, j0, j1 + 1, j1 + 1))
        weights.extend((w, -w, -w, w))

    for v in values:
        previous = v.producer
        for c in v.consumers:
            # Enters stage [i, j] when it starts after the producer and its first use at or after i is c <= j.
            add(previous + 1, c, c, n - 1, v.transfer_time)
            previous = c
        # Leaves stage [i, j] when the stage holds the producer and some use comes after j.
        add(0, v.producer, v.producer, v.consumers[-1] - 1, v.transfer_time)
    diff = torch.zeros((n + 1, n + 1), dtype=torch.float64)
    if rows:
        index = (torch.tensor(rows), torch.tensor(cols))
        diff.index_put_(index, torch.tensor(weights, dtype=torch.float64), accumulate=True)
    cost += torch.cumsum(torch.cumsum(diff, 0), 1)[:n, :n]
    cost[torch.ones(n, n, dtype=torch.bool).tril(-1)] = torch.inf
    for cut in forbidden:
        cost[cut, :] = torch.inf  # no stage may start at a forbidden cut
        cost[:, cut - 1] = torch.inf  # nor end just before it
    return cost


def solve_partition(cost: torch.Tensor, K: int, fits=None) -> list[int] | None:
    """Cut positions (the first index of stages 1..K-1) minimising the max stage cost, then the
    sum of squares among optimal partitions. ``fits(k)``, when given, is a boolean matrix of the
    (i, j) segments stage k may hold (its memory budget). None when no partition is feasible."""
    n = cost.shape[0]
    if K > n:
        return None
    inf = torch.full_like(cost, torch.inf)

    def stage_cost(k: int) -> torch.Tensor:
        return cost if fits is None else torch.where(fits(k), cost, inf)

    # Phase 1: the optimal bottleneck. Row i-1 of the max is a stage starting at i.
    best = stage_cost(0)[0].clone()
    for k in range(1, K):
        best = torch.maximum(best[:-1, None], stage_cost(k)[1:, :]).amin(dim=0)
    bottleneck = float(best[n - 1])
    if not math.isfinite(bottleneck):
        return None

    # Phase 2: among stages no slower than the bottleneck, the smallest sum of squares.
    def allowed(k: int) -> torch.Tensor:
        c = stage_cost(k)
        return torch.where(c <= bottleneck * (1 + 1e-12), c**2, inf)

    total = allowed(0)[0].clone()
    choices = []
    for k in range(1, K):
        candidates = total[:-1, None] + allowed(k)[1:, :]
        total, choice = candidates.min(dim=0)
        choices.append(choice + 1)
    if not math.isfinite(float(total[n - 1])):
        return None
    cuts, end = [], n - 1
    for choice in reversed(choices):
        start = int(choice[end])
        cuts.append(start)
        end = start - 1
    return sorted(cuts)


def exists_in_segment(n: int, items) -> torch.Tensor:
    """sum of weights of the items with a position inside segment [i, j], for every (i, j).

    ``items`` is (sorted positions, weight) pairs: a parameter and the nodes that use it, or a
    saved tensor and the nodes that save it; each counts once per segment however often it occurs.
    """
    rows, cols, weights = [], [], []
    for positions, w in items:
        previous = -1
        for c in positions:
            # The first position at or after i is c: the segment holds it when j >= c.
            rows.extend((previous + 1, c + 1))
            cols.extend((c, c))
            weights.extend((w, -w))
            previous = c
    diff = torch.zeros((n + 1, n + 1), dtype=torch.float64)
    if rows:
        diff.index_put_(
            (torch.tensor(rows), torch.tensor(cols)),
            torch.tensor(weights, dtype=torch.float64),
            accumulate=True,
        )
    return torch.cumsum(torch.cumsum(diff, 0), 1)[:n, :n]


def memory_fits(gm: fx.GraphModule, ctx: CompileContext, order: list[fx.Node], budget: int):
    """fits(k): which segments stage k can hold within ``budget`` without recomputation.

    Parameters count with their gradients and optimizer state, once per stage that uses them;
    a saved tensor counts once per stage that saves it, times the micro-batches stage k keeps
    in flight; transfers count once per direction; the working tensors are twice the segment's
    largest tensor, and on a GPU AdamW's step temporaries (a parameter's worth) replace the
    activations where larger, as ``ppcompile.memory`` counts them."""
    n = len(order)
    by_name = {node.name: node for node in gm.graph.nodes}
    optimizer = ctx.config.optimizer
    per_param = 2 + OPTIMIZER_STATE_FACTOR[optimizer]
    model = ctx.spec.module
    static: dict[int, tuple[list[int], float]] = {}
    stepped: dict[int, tuple[list[int], float]] = {}
    saved: dict[str, tuple[set[int], float]] = {}
    temp = torch.zeros(n + 1, dtype=torch.float64)
    largest = torch.zeros(n, dtype=torch.float64)
    for i, node in enumerate(order):
        for t, is_param in held_tensors(model, node):
            nbytes = t.numel() * t.element_size()
            static.setdefault(id(t), ([], nbytes * (per_param if is_param else 1)))[0].append(i)
            if is_param:
                stepped.setdefault(id(t), ([], nbytes * OPTIMIZER_STEP_TEMPORARIES[optimizer]))[0].append(i)
        cost = node.meta["ppc.cost"]
        temp[i + 1] = cost.saved_temp_bytes
        largest[i] = allocated_bytes(by_name, node)
        for name in cost.saved_inputs:
            root = storage_root(by_name, name)
            if root is not None:
                saved.setdefault(root.name, (set(), float(root.meta.get("ppc.nbytes", 0))))[0].add(i)
    static_bytes = exists_in_segment(n, [(sorted(set(p)), w) for p, w in static.values()])
    act = exists_in_segment(n, [(sorted(p), w) for p, w in saved.values()])
    prefix = torch.cumsum(temp, 0)
    act += prefix[None, 1:] - prefix[:-1, None]
    _, values, _ = _problem(gm, ctx, order, weight=lambda node: node.meta["ppc.nbytes"])
    transfers = segment_costs([0.0] * n, values, set())
    fixed = static_bytes + transfers
    del static_bytes, transfers
    working = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        working[i, i:] = 2 * torch.cummax(largest[i:], 0).values
    # On a CPU AdamW steps one parameter at a time: its temporaries are small beside the rest.
    at_once = steps_every_parameter_at_once(ctx.profile.name, ctx.profiled_on)
    update = exists_in_segment(n, [(sorted(set(p)), w) for p, w in stepped.values() if at_once])

    def fits(k: int) -> torch.Tensor:
        return fixed + torch.maximum(act * ctx.live_microbatches[k] + working, update) <= budget

    return fits


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
