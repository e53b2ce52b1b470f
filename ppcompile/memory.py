"""The memory model: what a rank holds at its peak, and the budget it must fit.

Per rank: parameters, their gradients, optimizer state (AdamW keeps two float32 moments per
parameter, SGD none), model buffers, activations saved for backward times the micro-batches
the schedule keeps in flight on that stage, transfer buffers (a receive buffer per micro-batch:
the runtime posts a step's receives when it starts; one micro-batch of sends), when regions are
recomputed the largest region's activations while it is being recomputed, and the working
tensors of the operation running at the peak: twice the stage's largest tensor (in backward its
gradient arriving and the gradient leaving; in forward an input not saved beside its output).
The optimizer step's own temporaries replace the activations, which are freed by then, where
they are larger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx, nn

from ppcompile.errors import CompileError

OPTIMIZER_STATE_FACTOR = {"sgd": 0.0, "adamw": 2.0}  # state bytes per parameter byte (float32 params)
# AdamW's step divides by the square root of the second moment, which it computes into a new tensor:
# on a GPU for every parameter at once (the foreach kernels), on a CPU one parameter at a time.
# SGD without momentum adds the scaled gradient in place.
OPTIMIZER_STEP_TEMPORARIES = {"sgd": 0.0, "adamw": 1.0}  # bytes per parameter byte


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
    transfers: float  # receive buffers for every micro-batch, and one micro-batch of sends
    recompute: float  # the largest recomputed region's activations, alive during its backward
    working: float  # the operation running at the peak: its input and output, or their gradients
    update: float  # the optimizer step's temporaries, once the step's activations are freed

    @property
    def activations(self) -> float:
        return self.activations_per_microbatch * self.live_microbatches

    @property
    def total(self) -> float:
        static = self.parameters + self.gradients + self.optimizer + self.buffers + self.transfers
        return static + max(self.activations + self.recompute + self.working, self.update)

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


def held_tensors(model: nn.Module, node: fx.Node) -> list[tuple[torch.Tensor, bool]]:
    """The parameters and buffers a node reads, each with whether it is a parameter: a leaf module's
    own, and those it gets as ``get_attr`` inputs."""
    held = []
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        held += [(p, True) for p in module.parameters()]
        held += [(b, False) for b in module.buffers()]
    for dep in node.all_input_nodes:
        if dep.op == "get_attr":
            owner, _, name = dep.target.rpartition(".")
            value = getattr(model.get_submodule(owner) if owner else model, name)
            held.append((value, value.requires_grad))
    return held


def storage_root(nodes: dict[str, fx.Node], name: str, own: set[str] | None = None) -> fx.Node | None:
    """The node whose storage value ``name`` lives in, through views; None for parameters and buffers.

    With ``own`` (one stage's node names), the walk stops at the stage's edge: a value received
    from another stage (or a model input) arrives there as a storage of its own."""
    node = nodes[name]
    while node.meta.get("ppc.view_of") and (own is None or node.name in own):
        node = nodes[node.meta["ppc.view_of"]]
    return None if node.op == "get_attr" else node


def allocated_bytes(nodes: dict[str, fx.Node], node: fx.Node) -> float:
    """The largest tensor ``node``'s operation allocates: its result (nothing for a view or a value
    that is not a tensor), or a leaf module's own saved temporary (the attention weights inside
    ``nn.MultiheadAttention``) where larger. Twice the largest of a stage is its working memory."""
    if node.meta.get("ppc.kind") != "tensor" or storage_root(nodes, node.name) is not node:
        return 0.0
    return max(float(node.meta.get("ppc.nbytes", 0)), node.meta["ppc.cost"].saved_temp_bytes)
