"""The memory model: what a rank holds at its peak, and the budget it must fit.

Per rank: parameters, their gradients, optimizer state (AdamW keeps two moments per parameter,
RMSprop one, SGD none: ``OPTIMIZER_MEMORY``), model buffers, activations saved for backward times the micro-batches
the schedule keeps in flight on that stage, transfer buffers (a receive buffer per micro-batch:
the runtime posts a step's receives when it starts; one micro-batch of sends), when regions are
recomputed the largest region's activations while it is being recomputed, and the working
tensors of the operation running at the peak (``working_bytes``). The optimizer step's own
temporaries replace the activations, which are freed by then, where they are larger.

The partitioner's memory check (``passes/partition_stages.py``) counts every segment of the
graph by the rules here, so a partition it finds fitting fits ``plan_memory``'s count too.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from ppcompile.errors import CompileError


@dataclass(frozen=True)
class OptimizerMemory:
    """What an optimizer holds and allocates, per byte of a trained parameter (PyTorch's defaults)."""

    state: float  # bytes of state kept between steps: AdamW's two moments are 2.0
    step_copies: int  # temporaries its step makes of a parameter's size, stepping one at a time


# Every optimizer runtime.train.OPTIMIZERS offers, by the name --optimizer takes.
OPTIMIZER_MEMORY = {
    "sgd": OptimizerMemory(0.0, 0),  # adds in place
    "sgd-momentum": OptimizerMemory(1.0, 0),  # the momentum buffer, updated in place
    # exp_avg and exp_avg_sq; (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps) holds two copies.
    "adam": OptimizerMemory(2.0, 2),
    "adamw": OptimizerMemory(2.0, 2),
    "rmsprop": OptimizerMemory(1.0, 1),  # square_avg; square_avg.sqrt().add_(eps) holds one copy
    "adagrad": OptimizerMemory(1.0, 1),  # the sum of squares; state_sum.sqrt().add_(eps) holds one
}


def parameter_bytes_held(optimizer: str) -> float:
    """Bytes a rank holds per byte of parameter it owns: the parameter, its gradient, the optimizer's state."""
    return 2.0 + OPTIMIZER_MEMORY[optimizer].state


def optimizer_step_bytes(optimizer: str, parameter_bytes: Iterable[float], at_once: bool) -> float:
    """The most the optimizer's step allocates at once beside its state, for parameters of these sizes.

    AdamW divides by the square root of the second moment, which it computes into new tensors. On a
    GPU the foreach kernels take the root of every parameter's moment at once, then work in place:
    one copy of all parameters. On a CPU it steps one parameter at a time, and
    ``(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`` holds the root and the quotient
    together: two copies of the largest parameter. RMSprop and Adagrad take one root (one copy);
    SGD, with or without momentum, works in place.

    >>> optimizer_step_bytes("adamw", [4.0, 8.0], at_once=False), optimizer_step_bytes("rmsprop", [4.0, 8.0], at_once=True)
    (16.0, 12.0)
    """
    copies = OPTIMIZER_MEMORY[optimizer].step_copies
    if not copies:
        return 0.0
    sizes = [float(b) for b in parameter_bytes]
    return sum(sizes) if at_once else copies * max(sizes, default=0.0)


def send_buffer_bytes(nbytes: float, requires_grad: bool, microbatches: int) -> float:
    """What a tensor sent to one stage holds on its producer's rank: the micro-batch being sent, and
    a receive buffer per micro-batch for its gradient (the runtime posts a step's receives when the
    step starts)."""
    return nbytes * (1 + (microbatches if requires_grad else 0))


def receive_buffer_bytes(nbytes: float, requires_grad: bool, microbatches: int) -> float:
    """What a tensor received from another stage holds on the receiving rank: a receive buffer per
    micro-batch, and the micro-batch of its gradient being sent back."""
    return nbytes * (microbatches + (1 if requires_grad else 0))


def steps_every_parameter_at_once(device_profile: str, profiled_on: str | None) -> bool:
    """Whether the optimizer's step makes its temporaries for all parameters together (PyTorch's
    foreach kernels, the default on a GPU) rather than one parameter at a time (on a CPU)."""
    return device_profile != "cpu" or (profiled_on or "").startswith("cuda")


_UNITS = {
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"16GiB"`` -> 17179869184; a number without a unit is refused, since 16 could mean anything.

    >>> parse_bytes("512MiB")
    536870912
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)?\s*", text or "")
    if not match:
        raise CompileError(f"--memory-per-device {text!r} is not a size; write e.g. 16GiB, 80GB or 512MiB")
    number, unit = match.groups()
    if unit is None:
        raise CompileError(f"--memory-per-device {text!r} has no unit; write e.g. {text}GiB or {text}GB")
    if unit.lower() not in _UNITS:
        raise CompileError(
            f"--memory-per-device {text!r}: unknown unit {unit!r}; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    return int(float(number) * _UNITS[unit.lower()])


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes of one stage on its rank, by what holds them."""

    parameters: float
    gradients: float
    optimizer: float
    buffers: float  # model buffers (masks, running statistics)
    activations_per_microbatch: float  # saved for backward, one micro-batch, after recomputation
    live_microbatches: int  # micro-batches in flight at once under the schedule
    # receive buffers for every micro-batch, and one micro-batch of sends; for inference, on the last
    # stage, what forward returns for every micro-batch of the step
    transfers: float
    recompute: float  # the largest recomputed region's activations, alive during its backward
    working: float  # the operation running at the peak: the largest working_bytes of the stage's nodes
    update: float  # the optimizer step's temporaries, once the step's activations are freed

    @property
    def activations(self) -> float:
        return self.activations_per_microbatch * self.live_microbatches

    @property
    def held(self) -> float:
        """What the step's compute holds beside the static bytes: activations, the recomputed
        region's and the running operation's tensors."""
        return self.activations + self.recompute + self.working

    @property
    def total(self) -> float:
        static = self.parameters + self.gradients + self.optimizer + self.buffers + self.transfers
        return static + max(self.held, self.update)

    def as_dict(self) -> dict:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "buffers": self.buffers,
            "activations_per_microbatch": self.activations_per_microbatch,
            "live_microbatches": self.live_microbatches,
            "transfers": self.transfers,
            "recompute": self.recompute,
            "working": self.working,
            "update": self.update,
            "total": self.total,
        }


def held_tensors(model: nn.Module, node: fx.Node) -> list[tuple[torch.Tensor, str]]:
    """The parameters and buffers a node reads, each with its role: ``"trained"`` (a parameter that
    gets a gradient, optimizer state and an update), ``"frozen"`` (a parameter with
    ``requires_grad`` off, held and nothing more, as in fine-tuning) or ``"buffer"``. A leaf
    module's own, and those it gets as ``get_attr`` inputs.

    Example: for ``lora_B(lora_A(x)) + base(x)`` with ``base`` frozen, the ``base`` node holds
    ``[(base.weight, "frozen"), (base.bias, "frozen")]``."""
    held = []
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        held += [(p, _parameter_role(p)) for p in module.parameters()]
        held += [(b, "buffer") for b in module.buffers()]
    for dep in node.all_input_nodes:
        if dep.op == "get_attr":
            owner, _, name = dep.target.rpartition(".")
            value = getattr(model.get_submodule(owner) if owner else model, name)
            held.append((value, _parameter_role(value) if isinstance(value, nn.Parameter) else "buffer"))
    return held


def _parameter_role(parameter: torch.Tensor) -> str:
    # What the runtime's optimizer steps: the parameters that get a gradient.
    return "trained" if parameter.requires_grad else "frozen"


def storage_root(nodes: dict[str, fx.Node], name: str, own: set[str] | None = None) -> fx.Node | None:
    """The node whose storage value ``name`` lives in, through views; None for parameters and buffers.

    With ``own`` (one stage's node names), the walk stops at the stage's edge: a value received
    from another stage (or a model input) arrives there as a storage of its own. A view every
    stage makes itself (a free node, ``partition_stages.is_free``: a buffer's or an input's slice) is walked
    through."""
    node = nodes[name]
    while node.meta.get("ppc.view_of") and (
        own is None or node.name in own or node.meta.get("ppc.stage") is None
    ):
        node = nodes[node.meta["ppc.view_of"]]
    return None if node.op == "get_attr" else node


def saved_values(nodes: dict[str, fx.Node], node: fx.Node) -> list[str]:
    """The graph values ``node`` keeps for backward, parameters and buffers left out. A tuple kept
    whole (a ``--profile`` measurement names the node itself) counts as the tensors its getitem
    users take out of it, the values that hold them."""
    names = []
    for name in node.meta["ppc.cost"].saved_inputs:
        value = nodes[name]
        if value.op == "get_attr":
            continue
        names += tuple_items(value) if value.meta.get("ppc.kind") == "tuple" else [name]
    return names


def tuple_items(node: fx.Node) -> list[str]:
    """The getitem nodes that take tensors out of tuple ``node``, through nested tuples."""
    items = []
    for user in node.users:
        if user.target is operator.getitem and user.args[0] is node:
            items += tuple_items(user) if user.meta.get("ppc.kind") == "tuple" else [user.name]
    return items


def _takes_from_tuple(node: fx.Node) -> bool:
    source = node.args[0] if node.target is operator.getitem and node.args else None
    return isinstance(source, fx.Node) and source.meta.get("ppc.kind") == "tuple"


def allocated_bytes(nodes: dict[str, fx.Node], node: fx.Node) -> float:
    """The bytes ``node``'s operation allocates for its result: a tensor, or every tensor of a tuple
    (``nn.LSTM``'s output and states). Nothing for a view, nor for an item taken out of a tuple,
    which the tuple's node allocated."""
    if node.meta.get("ppc.kind") not in ("tensor", "tuple") or _takes_from_tuple(node):
        return 0.0
    if storage_root(nodes, node.name) is not node:
        return 0.0
    return float(node.meta.get("ppc.nbytes", 0))


def working_bytes(nodes: dict[str, fx.Node], node: fx.Node, new_gradients: float = 0.0) -> float:
    """The tensors alive while ``node`` runs beside what the stage saves for backward: its result
    and its input (forward), or its result's gradient arriving and its input's gradient leaving
    (backward), each about the size of its result; where the operation keeps a larger temporary
    for backward (nn.MultiheadAttention's attention weights, nn.LSTM's workspace), its backward
    makes scratch of about that size instead of the second. The largest over a stage's nodes is
    its working memory. Measured on a CPU, nn.LSTM's backward peaks at its workspace plus its
    gradients, not at two workspaces.

    ``new_gradients``: the bytes of the gradients its backward makes for the parameters it trains,
    where they are new tensors beside the ``.grad`` autograd adds them into
    (:func:`accumulated_gradient_bytes`). They are made with its inputs' gradients, which are
    the size of its inputs: a 2048 -> 32 layer's backward holds little beside its weight's
    gradient, an LM head's its logits' gradient arriving."""
    result = allocated_bytes(nodes, node)
    beside = max(result, float(node.meta["ppc.cost"].saved_temp_bytes))
    if new_gradients:
        inputs = sum(
            d.meta["ppc.nbytes"]
            for d in node.all_input_nodes
            if d.op != "get_attr" and d.meta.get("ppc.kind") == "tensor"
        )
        beside = max(beside, inputs + new_gradients)
    return result + beside


def accumulated_gradient_bytes(model: nn.Module, node: fx.Node, microbatches: int) -> float:
    """The gradients ``node``'s backward makes for the parameters it trains, held beside their
    ``.grad`` until autograd adds them in: the first micro-batch's gradient becomes the ``.grad``
    itself, each later one is a new tensor the parameter's size (a 512x512 layer's backward held
    1 MiB more from the second micro-batch on, measured on a CPU)."""
    if microbatches < 2:
        return 0.0
    return float(
        sum(t.numel() * t.element_size() for t, role in held_tensors(model, node) if role == "trained")
    )


def updates_buffers(node: fx.Node) -> bool:
    """Whether ``node``'s forward updates a model buffer in place (BatchNorm's running statistics
    in training): recomputing it in backward would apply the update twice."""
    return bool(node.meta.get("ppc.writes_buffers"))  # set by estimate_costs.writes_buffers


def updates_own_buffers(node: fx.Node) -> bool:
    """Whether ``node`` is a leaf module (a BatchNorm) that updates its buffers in forward: a
    recomputation of it gets them as forward found them and leaves them as it found them
    (``runtime.recompute.buffers_as_in_forward``)."""
    return node.op == "call_module" and updates_buffers(node)


def recomputable(node: fx.Node) -> bool:
    """Whether ``node`` may run again in backward: it updates no buffer, or only its own
    (:func:`updates_own_buffers`). A buffer the model's own code updates (``self.ema.mul_(0.9)``,
    ``self.steps = self.steps + 1``) keeps its layer from it."""
    return not updates_buffers(node) or updates_own_buffers(node)


def buffer_copy_bytes(model: nn.Module, nodes: list[fx.Node]) -> float:
    """The copy of their buffers that recomputing ``nodes`` keeps per micro-batch in flight: those
    of the leaf modules among them that update theirs."""
    modules = {n.target for n in nodes if updates_own_buffers(n)}
    return float(
        sum(b.numel() * b.element_size() for target in modules for b in model.get_submodule(target).buffers())
    )
