"""The executor: interprets one rank's action list for one training (or inference) step.

It is a generator: it yields (the action it waits on) whenever a receive has nothing to
read yet, which only happens under the in-process transport, where the caller then lets
another rank run. Under ``torch.distributed`` a receive blocks instead, so the generator
runs straight through.

The same executor runs the training schedule and the forward-only inference schedule
(:func:`inference_actions`); run the latter under ``torch.no_grad()``. With a ``timings``
list, :meth:`RankExecutor.run` also records when each action starts and ends (see
``ppcompile.runtime.trace``).

Gradients: the last stage backpropagates ``loss / M``, so accumulated gradients equal
those of the mean loss over the step's M micro-batches, as in the eager model. A schedule
runs a micro-batch's backward either whole (``B``) or split in two (``I`` then, later, ``W``;
see :func:`backward_input`).
"""

from __future__ import annotations

import math
import operator
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge, saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef

from ppcompile.runtime.actions import Action, ActionKind, format_rank_actions, parse_rank_actions
from ppcompile.runtime.loader import Program
from ppcompile.runtime.outputs import loss_in
from ppcompile.runtime.randomness import RandomStream, stage_seed
from ppcompile.runtime.trace import ActionTiming
from ppcompile.runtime.transport import MessageKey, Receive

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.complex64,  # rotary embeddings as LLaMA computes them (torch.polar)
        torch.complex128,
    )
}


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]


def evaluate_dim(expr: str, symbols: dict[str, int]) -> int:
    """A symbolic dim from program.json (``"b"``, ``"2*s"``, ``"b*s"``) at this micro-batch's sizes."""
    return int(eval(expr, _EXPRESSION_NAMES, dict(symbols)))  # noqa: S307 - our own sympy output


# What program.json's expressions may call besides the symbols: an int's T // 2 and T % 2.
_EXPRESSION_NAMES = {"__builtins__": {}, "floor": math.floor, "Mod": operator.mod}


def decided_otherwise(program: dict, symbols: dict[str, int]) -> str | None:
    """Why a micro-batch of these sizes would not run as the model's forward does, or None: a
    condition on shapes forward decided when the program was traced (a loop over
    ``range(x.size(1))`` unrolled 4 times, ``if x.size(1) > 5``) comes out otherwise at these sizes,
    or was computed from a dim that differs here (``program``: program.json's ``decided``).

    >>> decided = [{"where": "m.py:9: `range(x.size(1))`", "value": 4, "formula": "s"}]
    >>> program = {"symbols": {"b": 4, "s": 4}, "decided": decided}
    >>> decided_otherwise(program, {"b": 4, "s": 4}) is None, decided_otherwise(program, {"b": 4, "s": 7})
    (True, 'm.py:9: `range(x.size(1))` decides 7 here but 4 where the program was traced')
    """
    compiled = program["symbols"]
    for decided in program.get("decided", ()):
        where, value = decided["where"], decided["value"]
        if "formula" in decided:
            here = decided_value(decided["formula"], value, symbols)
            if here != value:
                return f"{where} decides {here} here but {value} where the program was traced"
        else:
            moved = [s for s in decided["depends_on"] if symbols.get(s, compiled[s]) != compiled[s]]
            if moved:
                return (
                    f"{where} was decided ({value}) from a size that {' and '.join(moved)} set, which differs"
                )
    return None


def decided_value(formula: str, traced: bool | int, symbols: dict[str, int]) -> bool | int:
    """A decided condition's ``formula`` (program.json's ``decided``) at these sizes, as a bool or
    an int like the value ``traced``."""
    value = eval(formula, _EXPRESSION_NAMES, dict(symbols))  # noqa: S307 - our own sympy output
    return bool(value) if isinstance(traced, bool) else int(value)


def size_value(spec: dict, symbols: dict[str, int]) -> object:
    """A stage's non-tensor input from program.json's ``sizes`` at this micro-batch's sizes: an int
    from a shape that an earlier stage made (``T = x.size(1)``) and this one uses, never sent.

    >>> size_value({"name": "getitem_8", "kind": "torch.Size", "value": ["b", "s", "64"]}, {"b": 4, "s": 32})
    torch.Size([4, 32, 64])
    >>> size_value({"name": "add_2", "kind": "tuple", "value": ["-1", "s"]}, {"b": 4, "s": 9})
    (-1, 9)
    """
    kind, value = spec["kind"], spec["value"]
    if kind == "constant":
        return value
    if kind == "int":
        return evaluate_dim(value, symbols)
    if kind == "tuple":  # of ints: (-1,) + input_shape[1:] + (h.size(-1),)
        return tuple(evaluate_dim(v, symbols) for v in value)
    return torch.Size(evaluate_dim(v, symbols) for v in value)  # "torch.Size"


def size_arguments(info: dict, symbols: dict[str, int]) -> list:
    """The ints from shapes a stage computes (``size_value``), in its signature's order."""
    return [size_value(spec, symbols) for spec in info.get("sizes", ())]


def stage_arguments(info: dict, microbatch: dict, received: dict, sizes: list) -> list:
    """A stage's forward arguments, in its signature's order: the model inputs it loads, the
    boundary tensors it received, the ints from shapes it computes (``size_arguments``)."""
    return [microbatch[n] for n in info["inputs"]] + [received[n] for n in info["receives"]] + sizes


def symbol_values(program: Program, microbatch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Read b, s, ... off one micro-batch's inputs, as program.json's input shapes name them."""
    values = {}
    for spec in program.data["inputs"]:
        tensor = microbatch[spec["name"]]
        for dim, expr in enumerate(spec["shape"]):
            if expr.isidentifier():
                values[expr] = int(tensor.shape[dim])
    return values


def forward_only_schedule(program: Program) -> dict:
    """The forward-only schedule, in program.json's ``"schedule"`` layout, for programs compiled
    without an ``"inference_schedule"``: per rank, for each micro-batch in order, for each of the
    rank's stages in order, ``RECV_F`` (if the stage receives anything), ``F``, ``SEND_F`` (if it
    sends anything). No rank can deadlock: sends do not block, and everything an action waits for
    (its producers' forward of the same micro-batch, the rank's earlier actions) comes before it in
    (micro-batch, stage) order.
    """
    M = program.data["schedule"]["microbatches"]
    ranks = {}
    for rank in range(program.num_ranks):
        actions = []
        for m in range(M):
            for stage in program.stages_of_rank(rank):
                info = program.stage(stage)
                if info["receives"]:
                    actions.append(Action(stage, ActionKind.RECV_F, m))
                actions.append(Action(stage, ActionKind.F, m))
                if info["sends"]:
                    actions.append(Action(stage, ActionKind.SEND_F, m))
        ranks[str(rank)] = format_rank_actions(actions)
    V = program.data["schedule"].get("virtual_stages", 1)
    return {"name": "forward-only", "microbatches": M, "virtual_stages": V, "ranks": ranks}


def inference_schedule(program: Program) -> dict:
    """program.json's ``"inference_schedule"``, or :func:`forward_only_schedule` where it has none."""
    return program.data.get("inference_schedule") or forward_only_schedule(program)


def inference_actions(program: Program, rank: int) -> list[Action]:
    """``rank``'s forward-only action list, for :meth:`RankExecutor.run` under ``torch.no_grad()``."""
    return parse_rank_actions(inference_schedule(program)["ranks"][str(rank)])


@dataclass(frozen=True)
class StageMessages:
    """The messages one stage exchanges per micro-batch: per peer stage, the boundary tensors each
    carries, in program.json's boundary order (sender and receiver agree on it)."""

    activations_out: dict[int, tuple[str, ...]]  # consumer stage -> what SEND_F sends it
    activations_in: dict[int, tuple[str, ...]]  # producer stage -> what RECV_F receives from it
    gradients_out: dict[int, tuple[str, ...]]  # producer stage -> the gradients SEND_B sends it
    gradients_in: dict[int, tuple[str, ...]]  # consumer stage -> the gradients RECV_B receives from it


def stage_messages(program: Program, stage: int) -> StageMessages:
    """Group ``stage``'s boundary tensors into one message per peer stage and direction. A stage that
    receives ``h`` (a float activation) and ``mask`` (a bool) from stage 0 gets one message
    ``[h, mask]`` from it and sends back one message ``[grad of h]``."""
    groups: dict[str, dict[int, list[str]]] = {
        "activations_out": {},
        "activations_in": {},
        "gradients_out": {},
        "gradients_in": {},
    }
    for b in program.data["boundaries"]:
        name = b["name"]
        if b["producer"] == stage:
            for consumer in b["consumers"]:
                groups["activations_out"].setdefault(consumer, []).append(name)
                if b["requires_grad"]:
                    groups["gradients_in"].setdefault(consumer, []).append(name)
        if stage in b["consumers"]:
            groups["activations_in"].setdefault(b["producer"], []).append(name)
            if b["requires_grad"]:
                groups["gradients_out"].setdefault(b["producer"], []).append(name)
    return StageMessages(
        **{kind: {peer: tuple(names) for peer, names in sorted(g.items())} for kind, g in groups.items()}
    )


@dataclass
class MemoryStats:
    """Activations saved for backward, per stage, counted through saved_tensors_hooks."""

    peak_live_microbatches: dict[int, int] = field(default_factory=dict)
    peak_bytes: dict[int, int] = field(default_factory=dict)
    bytes_per_microbatch: dict[int, int] = field(default_factory=dict)


# Split backward: I (input grads) now, W (weight grads) later, for zero-bubble schedules ----------


class _Box:
    """One tensor that autograd saved for backward; emptied at I when W will not read it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor: torch.Tensor | None = tensor


def _unpacked_for_a_recomputation() -> bool:
    """Whether a recomputed region (``torch.utils.checkpoint``) is unpacking its inputs to run again:
    it does so in I for the first node inside it that I reaches, and again in W for a node inside it
    that W runs, however I reached it, so they must outlive I."""
    caller = sys._getframe(2)  # past _unpack: the Python code whose saved_tensors access called it
    return caller.f_code.co_filename == torch.utils.checkpoint.__file__


class SavedActivations:
    """``saved_tensors_hooks`` for one micro-batch of one stage whose backward is split.

    F puts every tensor autograd saves into a box. While I runs, a box unpacked by a node that W
    will not run again is logged; I empties those boxes when it is done. So the activations that
    only the input-grad half reads are freed at I, and W keeps just what the weight grads need.
    """

    def __init__(self, on_pack: Callable[[torch.Tensor], object] | None = None):
        self.on_pack = on_pack
        self.boxes: list[_Box] = []
        self.in_rerun_node = 0  # > 0 while I runs a node that W runs again
        self.log: list[_Box] | None = None  # during I: boxes unpacked by nodes W does not run

    def hooks(self) -> saved_tensors_hooks:
        return saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Box:
        if self.on_pack is not None:
            self.on_pack(tensor)
        box = _Box(tensor)
        self.boxes.append(box)
        return box

    def _unpack(self, box: _Box) -> torch.Tensor:
        if box.tensor is None:
            raise RuntimeError("W read an activation that I freed; the split backward kept too little")
        if self.log is not None and not self.in_rerun_node and not _unpacked_for_a_recomputation():
            self.log.append(box)
        return box.tensor

    def live_bytes(self) -> int:
        """Bytes of the distinct storages still held (parameters included)."""
        held = {
            StorageWeakRef(t.untyped_storage()): t for t in (b.tensor for b in self.boxes) if t is not None
        }
        return sum(t.untyped_storage().nbytes() for t in held.values())

    def enter_rerun_node(self, grad_outputs) -> None:  # a pre-hook
        self.in_rerun_node += 1

    def leave_rerun_node(self, grad_inputs, grad_outputs) -> None:  # a post-hook
        self.in_rerun_node -= 1


@dataclass
class _WeightGroup:
    """Parameters whose gradients meet in common nodes; W runs one backward per group."""

    edges: list[GradientEdge]  # where W restarts: inputs of nodes I ran, and roots I did not need
    grads: list[torch.Tensor]  # the gradient that arrived at each edge
    params: list[torch.Tensor]
    clamp: list[tuple[Node, tuple]]  # restart nodes that W also reaches from another edge: their grads


@dataclass
class PendingWeightGrads:
    """What I keeps for W of one micro-batch: the restart points of the weight-grad graph."""

    groups: list[_WeightGroup]
    saved: SavedActivations | None = None


def _postorder(starts: Iterable[Node], children: Callable[[Node], list[Node]]) -> list[Node]:
    """Every node reachable from ``starts``, each after all of its children (autograd graphs are DAGs)."""
    order: list[Node] = []
    entered: set[Node] = set()
    stack = [(node, False) for node in starts]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in entered:
            entered.add(node)
            stack.append((node, True))
            stack.extend((child, False) for child in children(node) if child not in entered)
    return order


def backward_input(
    roots: list[torch.Tensor],
    grads: list[torch.Tensor | None] | None,
    inputs: list[torch.Tensor],
    params: Iterable[torch.Tensor],
    saved: SavedActivations | None = None,
) -> tuple[list[torch.Tensor | None], PendingWeightGrads]:
    """The input-grad half of ``torch.autograd.backward(roots, grads)``; :func:`backward_weight` does the rest.

    Returns d(roots)/d(inputs) (None for an input the roots do not depend on) and what W needs.
    ``grads`` may be or hold None for a scalar root (the loss), as in ``backward``.

    The autograd graph from the roots splits in two. *Input-side* nodes lead to an input; I runs
    exactly those, through one ``torch.autograd.grad`` with respect to the inputs, so the engine
    computes only the input-side outputs of each node (a matmul's dX, not its dW). *Weight-only*
    nodes lead to parameters and never to an input. Gradient enters the weight-only part only from
    input-side nodes (*intermediates*) or from roots I did not need. A pre-hook
    on each intermediate records the gradient arriving at it during I. W restarts the backward
    at those intermediates with the recorded gradients and with respect to the parameters only:
    the engine re-enters each intermediate for its weight-side outputs alone (the dW matmul) and
    then runs the weight-only nodes. No input-side work is repeated, with one exception: when one
    parameter is reached from two intermediates, one below the other (the same weight used twice),
    W must restart from both in one call and reruns the input-side path between them; a pre-hook
    then replaces what reaches the lower one by the gradient I recorded for it, so nothing is
    counted twice. Parameters are grouped by the nodes they share, one ``backward`` per group,
    so each parameter's AccumulateGrad runs once with its whole gradient, as under B.

    I keeps the graph (``retain_graph``) only when W has work. With ``saved`` (the hooks F ran
    under), the activations read during I by nodes W does not run are freed at the end of I.
    """
    grads = [None] * len(roots) if grads is None else grads
    rooted = [(r, torch.ones_like(r) if g is None else g) for r, g in zip(roots, grads) if r.requires_grad]
    input_ids = {id(t) for t in inputs}
    param_ids = {id(p) for p in params if p.requires_grad}
    children: dict[Node, list[Node]] = {}

    def kids(node: Node) -> list[Node]:
        if node not in children:
            children[node] = [child for child, _ in node.next_functions if child is not None]
        return children[node]

    def leaf_id(node: Node) -> int:
        return id(getattr(node, "variable", None))  # AccumulateGrad holds its leaf tensor

    edges = [get_gradient_edge(r) for r, _ in rooted]
    reach: dict[Node, tuple[bool, bool]] = {}  # (leads to an input, leads to a parameter)
    for node in _postorder((e.node for e in edges), kids):
        reach[node] = (
            leaf_id(node) in input_ids or any(reach[c][0] for c in kids(node)),
            leaf_id(node) in param_ids or any(reach[c][1] for c in kids(node)),
        )

    def input_side(node: Node) -> bool:
        return reach[node][0]

    def weight_only(node: Node) -> bool:
        return reach[node] == (False, True)

    # Where W restarts: intermediates (recorded during I), then roots only parameters depend on.
    intermediates = [n for n in reach if input_side(n) and any(weight_only(c) for c in kids(n))]
    weight_roots = [(e, g) for e, (_, g) in zip(edges, rooted) if weight_only(e.node)]
    starts = [[c for c in kids(n) if weight_only(c)] for n in intermediates]
    starts += [[e.node] for e, _ in weight_roots]

    # Union the restart points whose weight-only subgraphs share a node; collect each one's parameters.
    group_of = list(range(len(starts)))

    def find(i: int) -> int:
        while group_of[i] != i:
            group_of[i] = group_of[group_of[i]]
            i = group_of[i]
        return i

    owner: dict[Node, int] = {}
    found: list[list[torch.Tensor]] = [[] for _ in starts]
    for i, nodes in enumerate(starts):
        stack = list(nodes)
        while stack:
            node = stack.pop()
            if node in owner:
                group_of[find(owner[node])] = find(i)
                continue
            owner[node] = i
            if leaf_id(node) in param_ids:
                found[i].append(node.variable)
            stack.extend(c for c in kids(node) if reach[c][1])
    members: dict[int, list[int]] = {}
    for i in range(len(starts)):
        members.setdefault(find(i), []).append(i)

    # The rare group whose intermediates lie one below another: W reruns the input side between them.
    rerun, clamped = set(intermediates), {}
    for idxs in members.values():
        tops = {intermediates[i] for i in idxs if i < len(intermediates)}
        if len(tops) > 1:
            between, lower = _input_side_between(tops, kids, input_side)
            rerun |= between
            clamped[idxs[0]] = lower

    # Groups whose weight gradients I takes itself, beside the inputs' (see UNSPLIT_BACKWARDS):
    # only groups I's backward reaches whole, with no root of their own that I does not start from.
    taken = {
        root
        for root, idxs in members.items()
        if all(i < len(intermediates) for i in idxs)
        and any(intermediates[i].name() in UNSPLIT_BACKWARDS for i in idxs)
    }
    taken_params = [p for root in taken for i in members[root] for p in found[i]]

    captured: dict[Node, tuple] = {}
    handles = [n.register_prehook(lambda g, n=n: captured.__setitem__(n, g)) for n in intermediates]
    if saved is not None:
        saved.log = []
        for node in rerun:
            handles.append(node.register_prehook(saved.enter_rerun_node))
            handles.append(node.register_hook(saved.leave_rerun_node))
    try:
        needed = [(r, g) for (r, g), e in zip(rooted, edges) if input_side(e.node)]
        input_grads: list[torch.Tensor | None] = [None] * len(inputs)
        if needed and inputs:
            found_grads = torch.autograd.grad(
                [r for r, _ in needed],
                [*inputs, *taken_params],
                [g for _, g in needed],
                retain_graph=len(taken) < len(members),
                allow_unused=True,
            )
            input_grads = list(found_grads[: len(inputs)])
            for param, grad in zip(taken_params, found_grads[len(inputs) :]):
                if grad is not None:
                    # What AccumulateGrad does, in the same micro-batch order as under B.
                    param.grad = grad if param.grad is None else param.grad + grad
    finally:
        for handle in handles:
            handle.remove()
        if saved is not None:
            for box in saved.log:
                box.tensor = None
            saved.log = None

    groups = []
    for root, idxs in members.items():
        if root in taken:
            continue
        restart, restart_grads = [], []
        for i in idxs:
            if i < len(intermediates):
                node = intermediates[i]
                for nr, grad in enumerate(captured.get(node, ())):
                    if grad is not None:
                        restart.append(GradientEdge(node, nr))
                        restart_grads.append(grad)
            else:
                edge, grad = weight_roots[i - len(intermediates)]
                restart.append(edge)
                restart_grads.append(grad)
        group_params = [p for i in idxs for p in found[i]]
        if restart and group_params:
            clamp = [(n, captured[n]) for n in clamped.get(idxs[0], ()) if n in captured]
            groups.append(_WeightGroup(restart, restart_grads, group_params, clamp))
    return input_grads, PendingWeightGrads(groups, saved)


# Backward nodes whose kernels must be asked for their input's gradient whenever they run: W
# would restart them for their weight's alone, which torch's CPU GroupNorm backward on a
# channels-last input does not survive (a segmentation fault, torch 2.13), so I takes those
# layers' weight gradients with the inputs'.
UNSPLIT_BACKWARDS = frozenset({"NativeGroupNormBackward0"})


def _input_side_between(
    tops: set[Node], kids: Callable[[Node], list[Node]], input_side: Callable[[Node], bool]
) -> tuple[set[Node], set[Node]]:
    """Input-side nodes below one of ``tops`` that lead to another, and the tops that lie below another."""

    def below(node: Node) -> list[Node]:
        return [c for c in kids(node) if input_side(c)]

    order = _postorder((c for t in tops for c in below(t)), below)
    leads: dict[Node, bool] = {}
    for node in order:
        leads[node] = node in tops or any(leads[c] for c in below(node))
    return {n for n in order if leads[n]}, tops.intersection(order)


def backward_weight(pending: PendingWeightGrads) -> None:
    """The weight-grad half: accumulate into ``p.grad`` what :func:`backward_input` left, then free it all."""
    for k, group in enumerate(pending.groups):
        handles = [node.register_prehook(lambda _, g=grads: g) for node, grads in group.clamp]
        try:
            # A group that reruns input-side nodes may run another group's restart node: keep the graph.
            last = k == len(pending.groups) - 1
            torch.autograd.backward(group.edges, group.grads, inputs=group.params, retain_graph=not last)
        finally:
            for handle in handles:
                handle.remove()
    pending.groups.clear()
    if pending.saved is not None:
        # Every saved tensor's unpack hook holds ``pending.saved``, whose boxes hold tensors whose
        # grad_fn holds those hooks: a cycle through autograd's C++ nodes that Python's collector
        # cannot see. Emptying the boxes breaks it, or each step's graphs would live forever.
        for box in pending.saved.boxes:
            box.tensor = None
        pending.saved.boxes.clear()
    pending.saved = None


def held_storages(modules: Iterable[nn.Module]) -> set[StorageWeakRef]:
    """The storages of the modules' parameters and buffers (running stats, rotary tables): memory
    they hold whatever runs, which a count of activations saved for backward leaves out."""
    return {StorageWeakRef(t.untyped_storage()) for m in modules for t in [*m.parameters(), *m.buffers()]}


class RankExecutor:
    def __init__(
        self,
        program: Program,
        rank: int,
        model: nn.Module,
        transport,
        device: torch.device | str = "cpu",
        track_memory: bool = False,
        seed: int = 0,
    ):
        self.program = program
        self.rank = rank
        self.transport = transport
        self.device = torch.device(device)
        self.stage_ids = program.stages_of_rank(rank)
        self.stages = {s: program.stage_class(s)(model).to(self.device) for s in self.stage_ids}
        self.actions: list[Action] = parse_rank_actions(program.data["schedule"]["ranks"][str(rank)])
        self.boundaries = {b["name"]: b for b in program.data["boundaries"]}
        # Per boundary tensor, its dims outermost first in memory (() for their own order).
        self._dim_order = {name: tuple(b.get("dim_order", ())) for name, b in self.boundaries.items()}
        self.rank_of_stage = program.rank_of_stage
        self.microbatches = program.data["schedule"]["microbatches"]
        self.track_memory = track_memory
        self.memory = MemoryStats()
        self._keys_cache: dict = {}
        self._sizes_cache: dict = {}
        self.messages = {s: stage_messages(program, s) for s in self.stage_ids}
        # Each stage draws its dropout masks from a stream of its own (``randomness``).
        self.random = {s: RandomStream(stage_seed(seed, s), self.device) for s in self.stage_ids}
        # The actions that the program's plan runs on every core, while the other ranks wait.
        self.own_threads = torch.get_num_threads()
        plan = program.data.get("spare_cores") if self.device.type == "cpu" else None
        self.spare_core_threads = min(plan["threads"], available_cores()) if plan else 0
        self.spare_core_actions: set[Action] = set()
        if plan and self.spare_core_threads > self.own_threads:
            self.spare_core_actions = set(parse_rank_actions(plan["ranks"].get(str(rank), "")))
        self.losses: dict[int, torch.Tensor] = {}
        # An inference program's last stage: per micro-batch, what the model's forward returns.
        self.results: dict[int, object] = {}
        # The stages' distinct parameters: fixed for the executor's life, asked for at every I.
        self._params = list({id(p): p for m in self.stages.values() for p in m.parameters()}.values())
        self._held_storages = held_storages(self.stages.values())

    def parameters(self) -> list[nn.Parameter]:
        return list(self._params)

    # One step -----------------------------------------------------------------------------

    def run(
        self,
        microbatches: list[dict[str, torch.Tensor]],
        actions: list[Action] | None = None,
        timings: list[ActionTiming] | None = None,
    ) -> Iterator[str]:
        """Run every action of this rank once over ``microbatches`` (inputs by name).

        ``actions`` replaces the training schedule's list, e.g. by :func:`inference_actions`
        (run that under ``torch.no_grad()``). With ``timings``, one :class:`ActionTiming` per
        action is appended, in ``time.perf_counter()`` seconds; a receive's time is the time it
        waited for its message.
        """
        training = actions is None  # the plan of spare cores is for the training schedule's timing
        actions = self.actions if actions is None else actions
        needed = 1 + max((a.microbatch for a in actions if a.microbatch is not None), default=-1)
        if len(microbatches) != needed:
            raise ValueError(
                f"rank {self.rank}: the schedule runs {needed} micro-batches, got {len(microbatches)}"
            )
        self.inputs = microbatches
        self.symbols = [symbol_values(self.program, mb) for mb in microbatches]
        self.received: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.outputs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.output_grads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.input_grads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.losses = {}
        self.results = {}
        self._live: dict[int, dict[int, int]] = {s: {} for s in self.stage_ids}
        self._saved: dict[tuple[int, int], SavedActivations] = {}
        self._pending_w: dict[tuple[int, int], PendingWeightGrads] = {}
        # Micro-batches whose backward is split into I and W: F boxes their saved tensors.
        self._split = {(a.stage, a.microbatch) for a in actions if a.kind == ActionKind.I}
        # On a GPU an action only queues kernels; a trace waits for them so each event shows its own time.
        sync = timings is not None and self.device.type == "cuda"
        # Every receive of the step is posted now, in the order the rank will wait on them: gloo
        # moves a message only once its receive is posted, so a sender that runs ahead (GPipe's
        # forwards) is not held up behind a receiver busy computing. The buffers cost one message
        # per micro-batch and direction, which the memory model counts.
        for action in actions:
            if action.kind in (ActionKind.RECV_F, ActionKind.RECV_B):
                self.transport.post(self._receive_keys(action)[0], str(action))
        for action in actions:
            start = time.perf_counter() if timings is not None else 0.0
            cpu_start = time.thread_time() if timings is not None else 0.0
            wide = training and action in self.spare_core_actions
            if action.kind in (ActionKind.RECV_F, ActionKind.RECV_B):
                receives, names = self._receive_keys(action)
                while (tensors := self.transport.try_receive(receives, str(action))) is None:
                    yield str(action)
                self._store_received(action, names, tensors)
            elif wide:
                torch.set_num_threads(self.spare_core_threads)
                try:
                    self._execute(action)
                finally:
                    torch.set_num_threads(self.own_threads)
            else:
                self._execute(action)
            if timings is not None:
                if sync:
                    torch.cuda.synchronize(self.device)
                threads = self.spare_core_threads if wide else 0
                timings.append(
                    ActionTiming(
                        str(action),
                        action.kind.value,
                        start,
                        time.perf_counter(),
                        threads,
                        time.thread_time() - cpu_start,
                    )
                )
        if self._pending_w:
            missing = ", ".join(f"{s}W{m}" for s, m in self._pending_w)
            raise ValueError(f"rank {self.rank}: the schedule runs I but never {missing}")
        self.transport.finish_step()

    def _execute(self, action: Action) -> None:
        stage, m = action.stage, action.microbatch
        info = self.program.stage(stage)
        if action.kind == ActionKind.F:
            # Without autograd no backward will read the inputs again: let them go after this forward.
            grad = torch.is_grad_enabled()
            received = self.received.get((stage, m), {}) if grad else self.received.pop((stage, m), {})
            inputs = {n: self.inputs[m][n].to(self.device) for n in info["inputs"]}
            args = stage_arguments(info, inputs, received, self._sizes(stage, m))
            if (stage, m) in self._split:
                pack = self._memory_hooks(stage, m)[0] if self.track_memory else None
                hooks = self._saved.setdefault((stage, m), SavedActivations(pack)).hooks()
            elif self.track_memory:
                hooks = saved_tensors_hooks(*self._memory_hooks(stage, m))
            else:
                hooks = nullcontext()
            with hooks, self.random[stage].drawing():
                out = self.stages[stage](*args)
            if grad or info["sends"]:
                self.outputs[(stage, m)] = out
            if info["returns_loss"]:
                self.losses[m] = out["loss"].detach()
            if info.get("returns_output"):
                self.results[m] = out["output"]
                if (loss := loss_in(out["output"])) is not None:
                    self.losses[m] = loss.detach()
        elif action.kind == ActionKind.SEND_F:
            # Training keeps the outputs for backward; forward-only drops them once sent.
            out = self.outputs[(stage, m)] if torch.is_grad_enabled() else self.outputs.pop((stage, m))
            for consumer, names in self.messages[stage].activations_out.items():
                key = MessageKey(m, False, stage, consumer)
                self.transport.send(
                    key, [out[n] for n in names], self.rank_of_stage[consumer], self._dim_orders(names)
                )
        elif action.kind == ActionKind.B:
            self._backward(stage, m, info)
        elif action.kind == ActionKind.I:
            self._backward_input(stage, m, info)
        elif action.kind == ActionKind.W:
            self._backward_weight(stage, m)
        elif action.kind == ActionKind.SEND_B:
            grads = self.input_grads.pop((stage, m), {})
            for producer, names in self.messages[stage].gradients_out.items():
                key = MessageKey(m, True, stage, producer)
                self.transport.send(
                    key, [grads[n] for n in names], self.rank_of_stage[producer], self._dim_orders(names)
                )
        else:
            raise NotImplementedError(
                f"rank {self.rank}: action {action} is not supported by this runtime yet"
            )

    def _roots(self, stage: int, m: int, info: dict) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """What backward starts from: ``loss / M`` on the loss stage, and each sent output with its grad."""
        out = self.outputs.pop((stage, m))
        roots, grads = [], []
        if info["returns_loss"]:
            roots.append(out["loss"] / self.microbatches)
            grads.append(None)
        for name, grad in self.output_grads.pop((stage, m), {}).items():
            if out[name].requires_grad:
                roots.append(out[name])
                grads.append(grad)
        return roots, grads

    def _backward(self, stage: int, m: int, info: dict) -> None:
        roots, grads = self._roots(stage, m, info)
        if roots:
            torch.autograd.backward(roots, grads)
        received = self.received.pop((stage, m), {})
        self.input_grads[(stage, m)] = {
            name: (t.grad if t.grad is not None else torch.zeros_like(t))
            for name, t in received.items()
            if self.boundaries[name]["requires_grad"]
        }
        if self.track_memory:
            self._live[stage].pop(m, None)

    def _backward_input(self, stage: int, m: int, info: dict) -> None:
        """I: input grads for SEND_B now; what W needs is kept, the rest freed (see :func:`backward_input`)."""
        roots, grads = self._roots(stage, m, info)
        received = self.received.pop((stage, m), {})
        names = [name for name in received if self.boundaries[name]["requires_grad"]]
        input_grads, pending = backward_input(
            roots, grads, [received[n] for n in names], self._params, self._saved.pop((stage, m), None)
        )
        # B reads t.grad, which AccumulateGrad lays out like t (contiguous); the same here.
        self.input_grads[(stage, m)] = {
            name: torch.zeros_like(received[name]) if grad is None else grad.contiguous()
            for name, grad in zip(names, input_grads)
        }
        self._pending_w[(stage, m)] = pending

    def _backward_weight(self, stage: int, m: int) -> None:
        """W: accumulate this micro-batch's parameter grads, then release its activations."""
        pending = self._pending_w.pop((stage, m), None)
        if pending is None:
            raise ValueError(f"rank {self.rank}: {stage}W{m} has no {stage}I{m} before it in the schedule")
        backward_weight(pending)
        if self.track_memory:
            self._live[stage].pop(m, None)

    def _sizes(self, stage: int, m: int) -> list:
        """The stage's ints from shapes at micro-batch ``m``'s sizes; reused across steps while the
        micro-batch shape stays the same."""
        cache_key = (stage, tuple(sorted(self.symbols[m].items())))
        sizes = self._sizes_cache.get(cache_key)
        if sizes is None:
            sizes = self._sizes_cache[cache_key] = size_arguments(self.program.stage(stage), self.symbols[m])
        return sizes

    def _receive_keys(self, action: Action):
        """The messages a receive action stands for, with peers and buffer shapes; reused across
        steps while the micro-batch shape stays the same (it is asked twice per receive)."""
        cache_key = (action, tuple(sorted(self.symbols[action.microbatch].items())))
        keys = self._keys_cache.get(cache_key)
        if keys is None:
            keys = self._keys_cache[cache_key] = self._make_receive_keys(action)
        return keys

    def _dim_orders(self, names) -> tuple[tuple[int, ...], ...]:
        """Per boundary tensor, its dims outermost first in memory, which its message keeps (a
        gradient's too: autograd lays a tensor's gradient out like the tensor)."""
        return tuple(self._dim_order[n] for n in names)

    def _make_receive_keys(self, action: Action) -> tuple[list[Receive], list[tuple[str, ...]]]:
        """The receive action's messages, and per message the boundary tensors it carries."""
        stage, m = action.stage, action.microbatch
        messages = self.messages[stage]
        gradient = action.kind == ActionKind.RECV_B
        receives, carried = [], []
        for peer, names in (messages.gradients_in if gradient else messages.activations_in).items():
            shapes = tuple(self._shape(self.boundaries[n], m) for n in names)
            dtypes = tuple(dtype_of(self.boundaries[n]["dtype"]) for n in names)
            key = MessageKey(m, gradient, peer, stage)
            receives.append(Receive(key, self.rank_of_stage[peer], shapes, dtypes, self._dim_orders(names)))
            carried.append(names)
        return receives, carried

    def _store_received(self, action: Action, carried: list[tuple[str, ...]], tensors) -> None:
        stage, m = action.stage, action.microbatch
        forward = action.kind == ActionKind.RECV_F
        store = (
            self.received.setdefault((stage, m), {})
            if forward
            else self.output_grads.setdefault((stage, m), {})
        )
        for names, message in zip(carried, tensors):
            for name, tensor in zip(names, message):
                tensor = tensor.to(self.device)
                if forward:
                    # Under no_grad (inference) nothing backpropagates into the received tensor.
                    if self.boundaries[name]["requires_grad"] and torch.is_grad_enabled():
                        tensor.requires_grad_(True)
                    store[name] = tensor
                else:
                    # A tensor sent to several consumers gets the sum of their gradients, in consumer order.
                    store[name] = store[name] + tensor if name in store else tensor

    def _shape(self, boundary: dict, m: int) -> torch.Size:
        return torch.Size(evaluate_dim(d, self.symbols[m]) for d in boundary["shape"])

    def _memory_hooks(self, stage: int, m: int):
        seen: set = set()
        live = self._live[stage]
        live.setdefault(m, 0)

        def pack(t: torch.Tensor):
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in seen and ref not in self._held_storages:
                seen.add(ref)
                live[m] += t.untyped_storage().nbytes()
                self.memory.bytes_per_microbatch[stage] = max(
                    self.memory.bytes_per_microbatch.get(stage, 0), live[m]
                )
                self.memory.peak_live_microbatches[stage] = max(
                    self.memory.peak_live_microbatches.get(stage, 0), len(live)
                )
                self.memory.peak_bytes[stage] = max(self.memory.peak_bytes.get(stage, 0), sum(live.values()))
            return t

        return pack, lambda t: t
