"""The executor: interprets one rank's action list for one training step.

It is a generator: it yields (the action it waits on) whenever a receive has nothing to
read yet, which only happens under the in-process transport, where the caller then lets
another rank run. Under ``torch.distributed`` a receive blocks instead, so the generator
runs straight through.

Gradients: the last stage backpropagates ``loss / M``, so accumulated gradients equal
those of the mean loss over the step's M micro-batches, as in the eager model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ppcompile.runtime.actions import Action, ActionKind, parse_rank_actions
from ppcompile.runtime.loader import Program
from ppcompile.runtime.transport import MessageKey

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
    )
}


def dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]


def evaluate_dim(expr: str, symbols: dict[str, int]) -> int:
    """A symbolic dim from program.json (``"b"``, ``"2*s"``, ``"b*s"``) at this micro-batch's sizes."""
    return int(eval(expr, {"__builtins__": {}}, dict(symbols)))  # noqa: S307 - our own sympy output


def symbol_values(program: Program, microbatch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Read b, s, ... off one micro-batch's inputs, as program.json's input shapes name them."""
    values = {}
    for spec in program.data["inputs"]:
        tensor = microbatch[spec["name"]]
        for dim, expr in enumerate(spec["shape"]):
            if expr.isidentifier():
                values[expr] = int(tensor.shape[dim])
    return values


@dataclass
class MemoryStats:
    """Activations saved for backward, per stage, counted through saved_tensors_hooks."""

    peak_live_microbatches: dict[int, int] = field(default_factory=dict)
    peak_bytes: dict[int, int] = field(default_factory=dict)
    bytes_per_microbatch: dict[int, int] = field(default_factory=dict)


class RankExecutor:
    def __init__(
        self,
        program: Program,
        rank: int,
        model: nn.Module,
        transport,
        device: torch.device | str = "cpu",
        track_memory: bool = False,
    ):
        self.program = program
        self.rank = rank
        self.transport = transport
        self.device = torch.device(device)
        self.stage_ids = program.stages_of_rank(rank)
        self.stages = {s: program.stage_class(s)(model).to(self.device) for s in self.stage_ids}
        self.actions: list[Action] = parse_rank_actions(program.data["schedule"]["ranks"][str(rank)])
        self.boundaries = {b["name"]: b for b in program.data["boundaries"]}
        self.boundary_index = {b["name"]: i for i, b in enumerate(program.data["boundaries"])}
        self.rank_of_stage = {s["id"]: s["rank"] for s in program.data["stages"]}
        self.microbatches = program.data["schedule"]["microbatches"]
        self.track_memory = track_memory
        self.memory = MemoryStats()
        self.losses: dict[int, torch.Tensor] = {}
        self._param_storages = {StorageWeakRef(p.untyped_storage()) for p in self.parameters()}

    def parameters(self) -> list[nn.Parameter]:
        seen, params = set(), []
        for module in self.stages.values():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # One step -----------------------------------------------------------------------------

    def run(self, microbatches: list[dict[str, torch.Tensor]]) -> Iterator[str]:
        """Run every action of this rank once over ``microbatches`` (inputs by name)."""
        assert len(microbatches) == self.microbatches, (len(microbatches), self.microbatches)
        self.inputs = microbatches
        self.symbols = [symbol_values(self.program, mb) for mb in microbatches]
        self.received: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.outputs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.output_grads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.input_grads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.losses = {}
        self._live: dict[int, dict[int, int]] = {s: {} for s in self.stage_ids}
        for action in self.actions:
            if action.kind in (ActionKind.RECV_F, ActionKind.RECV_B):
                keys = self._receive_keys(action)
                while (tensors := self.transport.try_receive(keys, str(action))) is None:
                    yield str(action)
                self._store_received(action, keys, tensors)
            else:
                self._execute(action)
        self.transport.finish_step()

    def _execute(self, action: Action) -> None:
        stage, m = action.stage, action.microbatch
        info = self.program.stage(stage)
        if action.kind == ActionKind.F:
            received = self.received.get((stage, m), {})
            args = [self.inputs[m][n].to(self.device) for n in info["inputs"]] + [
                received[n] for n in info["receives"]
            ]
            if self.track_memory:
                with torch.autograd.graph.saved_tensors_hooks(*self._memory_hooks(stage, m)):
                    out = self.stages[stage](*args)
            else:
                out = self.stages[stage](*args)
            self.outputs[(stage, m)] = out
            if info["returns_loss"]:
                self.losses[m] = out["loss"].detach()
        elif action.kind == ActionKind.SEND_F:
            out = self.outputs[(stage, m)]
            for name in info["sends"]:
                b = self.boundaries[name]
                for consumer in b["consumers"]:
                    key = MessageKey(self.boundary_index[name], m, False, stage, consumer)
                    self.transport.send(key, out[name], self.rank_of_stage[consumer])
        elif action.kind == ActionKind.B:
            self._backward(stage, m, info)
        elif action.kind == ActionKind.SEND_B:
            for name, grad in self.input_grads.pop((stage, m), {}).items():
                producer = self.boundaries[name]["producer"]
                key = MessageKey(self.boundary_index[name], m, True, stage, producer)
                self.transport.send(key, grad, self.rank_of_stage[producer])
        else:
            raise NotImplementedError(
                f"rank {self.rank}: action {action} is not supported by this runtime yet"
            )

    def _backward(self, stage: int, m: int, info: dict) -> None:
        out = self.outputs.pop((stage, m))
        roots, grads = [], []
        if info["returns_loss"]:
            roots.append(out["loss"] / self.microbatches)
            grads.append(None)
        for name, grad in self.output_grads.pop((stage, m), {}).items():
            if out[name].requires_grad:
                roots.append(out[name])
                grads.append(grad)
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

    def _receive_keys(self, action: Action):
        stage, m = action.stage, action.microbatch
        info = self.program.stage(stage)
        keys = []
        if action.kind == ActionKind.RECV_F:
            for name in info["receives"]:
                b = self.boundaries[name]
                key = MessageKey(self.boundary_index[name], m, False, b["producer"], stage)
                keys.append((key, self.rank_of_stage[b["producer"]], self._shape(b, m), dtype_of(b["dtype"])))
        else:
            for name in info["sends"]:
                b = self.boundaries[name]
                if not b["requires_grad"]:
                    continue
                for consumer in b["consumers"]:
                    key = MessageKey(self.boundary_index[name], m, True, consumer, stage)
                    keys.append((key, self.rank_of_stage[consumer], self._shape(b, m), dtype_of(b["dtype"])))
        return keys

    def _store_received(self, action: Action, keys, tensors) -> None:
        stage, m = action.stage, action.microbatch
        if action.kind == ActionKind.RECV_F:
            store = self.received.setdefault((stage, m), {})
            for (key, *_), tensor in zip(keys, tensors):
                name = self.program.data["boundaries"][key.boundary]["name"]
                tensor = tensor.to(self.device)
                if self.boundaries[name]["requires_grad"]:
                    tensor.requires_grad_(True)
                store[name] = tensor
        else:
            store = self.output_grads.setdefault((stage, m), {})
            for (key, *_), tensor in zip(keys, tensors):
                name = self.program.data["boundaries"][key.boundary]["name"]
                tensor = tensor.to(self.device)
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
            if ref not in seen and ref not in self._param_storages:  # weights are not activations
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
