"""Training steps over a whole program: data, micro-batching, tied gradients, optimizer.

``InProcessPipeline`` runs every rank in this process (tests, ``ppcompile verify``,
debugging on one device); ``run.py`` (``ppcompile.runtime.main``) runs one rank per
``torchrun`` process. Both drive the same ``RankExecutor``.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ppcompile.runtime.actions import Action
from ppcompile.runtime.executor import (
    MemoryStats,
    RankExecutor,
    decided_otherwise,
    evaluate_dim,
    inference_actions,
    symbol_values,
)
from ppcompile.runtime.loader import Program, ProgramError
from ppcompile.runtime.randomness import drawn_apart
from ppcompile.runtime.spec import ModelRef, ModelSpec, batch_by_name, inputs_left_out
from ppcompile.runtime.trace import ActionTiming, shift_timings
from ppcompile.runtime.transport import InProcessTransport


def model_ref(program: Program) -> ModelRef:
    """The model file, found relative to the program directory, and unchanged since compilation."""
    model = program.data["model"]
    candidates = [program.root / model["source_from_program"], Path(model["source"])]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ProgramError(
            f"model file {model['source']} not found (looked at {', '.join(map(str, candidates))})"
        )
    ref = ModelRef(str(path), model["factory"])
    if ref.sha256() != model["sha256"]:
        raise ProgramError(
            f"{path} changed since this program was compiled; recompile it with ppcompile compile"
        )
    return ref


def build_spec(program: Program, seed: int, device: str = "cpu") -> ModelSpec:
    """The model with the weights every rank (and the eager reference) gets for ``seed``."""
    return model_ref(program).build(device, seed=seed)


def batch_dims(program: Program) -> list[int | None]:
    """Per input, the dim micro-batches split: the first whose size the program writes in terms of
    ``b`` (dim 1 of a sequence-first ``[s, b]`` input); None for an input every micro-batch shares.

    >>> batch_dims(Program(Path("."), {"inputs": [{"shape": ["7", "b"]}, {"shape": ["b*s"]}, {"shape": ["s", "s"]}]}))
    [1, 0, None]
    """
    dims = []
    for spec in program.data["inputs"]:
        found = [d for d, expr in enumerate(spec["shape"]) if re.search(r"\bb\b", str(expr))]
        dims.append(found[0] if found else None)
    return dims


def resized(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t`` at ``shape``: along each dim whose size differs, its items taken in turn, so the example's
    rows repeat to make a larger batch (or the first rows make a smaller one).

    >>> resized(torch.tensor([[1, 2], [3, 4]]), (3, 2)).tolist()
    [[1, 2], [3, 4], [1, 2]]
    """
    for dim, size in enumerate(shape):
        if t.shape[dim] != size:
            t = t.index_select(dim, torch.arange(size, device=t.device) % t.shape[dim])
    return t


def batches(program: Program, spec: ModelSpec, seed: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Steps of M micro-batches, each a dict of inputs by name. Every rank makes the same ones."""
    M = program.data["schedule"]["microbatches"]
    names = [i["name"] for i in program.data["inputs"]]
    dims = batch_dims(program)
    micro = program.data["symbols"].get("b", 1)
    if spec.data is not None:
        # Drawn apart from the stages' dropout, so every rank gets the same batches (``randomness``).
        source = drawn_apart(lambda: spec.data(M * micro, seed), seed)
    else:
        # The example at the sizes the program was compiled for (--dims, --global-batch), M times.
        symbols = program.data["symbols"]
        example = tuple(
            resized(
                t, [evaluate_dim(str(e), symbols) * (M if k == d else 1) for k, e in enumerate(i["shape"])]
            )
            for t, d, i in zip(spec.example_inputs, dims, program.data["inputs"])
        )
        source = itertools.repeat(example)
    for batch in source:
        if spec.data is not None:  # a tuple like the example inputs, or a dict as model(**batch) takes
            left_out = inputs_left_out(spec, batch)
            if left_out:
                raise ProgramError(
                    f"the data function's batch gives {', '.join(map(repr, left_out))}, which forward takes "
                    "but the example inputs leave out, so the program was compiled without it; give it in "
                    "the example inputs too, or leave it out of the batch"
                )
            batch = batch_by_name(spec, batch)
            missing = [name for name in names if name not in batch]
            if missing:
                raise ProgramError(f"the data function's batch has no {', '.join(map(repr, missing))}")
            batch = [batch[name] for name in names]
        chunks = []
        for name, t, d in zip(names, batch, dims):
            if d is None:
                chunks.append([t] * M)
                continue
            if t.shape[d] % M:
                raise ProgramError(
                    f"input {name}: a batch of {t.shape[d]} (dim {d}) does not split into {M} micro-batches"
                )
            chunks.append(t.chunk(M, d))
        # A copy per micro-batch: a chunk is a view that would keep the whole batch alive while saved.
        microbatches = [dict(zip(names, (c[m].clone() for c in chunks))) for m in range(M)]
        sizes = symbol_values(program, microbatches[0])
        reason = decided_otherwise(program.data, sizes)
        if reason is not None:
            at = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
            traced = ", ".join(f"{k}={v}" for k, v in sorted(program.data["symbols"].items()))
            raise ProgramError(
                f"a micro-batch of {at} would not run as the model's forward does: {reason}; the stages "
                f"hold what forward decided at the sizes traced ({traced}): give batches of those sizes, "
                "or compile from an example of these"
            )
        yield microbatches


class _NoParameters:
    """The optimizer of a stage that holds no parameters (a loss-only or activation-only stage)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


# By the name --optimizer takes, each with PyTorch's defaults but the learning rate; the compiler's
# memory model (ppcompile/memory.py: OPTIMIZER_MEMORY) sizes each one's state and step.
OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "sgd-momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
}


def make_optimizer(name: str, params: list[nn.Parameter], lr: float):
    """``name``'s optimizer over ``params`` (one that does nothing where there are none).

    >>> type(make_optimizer("sgd-momentum", [nn.Parameter(torch.zeros(2))], 0.1)).__name__
    'SGD'
    """
    if name not in OPTIMIZERS:
        raise ProgramError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr) if params else _NoParameters()


def tied_parameters(program: Program, executor: RankExecutor) -> list[list[nn.Parameter]]:
    """Per tied group: the distinct parameter objects this rank holds for it that train. A frozen one
    gets no gradient to sum: a zero one in its place would still have AdamW's weight decay move it."""
    named = {}
    for module in executor.stages.values():
        named.update(dict(module.named_parameters(remove_duplicate=False)))
    groups = []
    for group in program.data["tied_parameters"]:
        params, seen = [], set()
        for fqn in group["parameters"]:
            p = named.get(fqn)
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        groups.append(params)
    return groups


class InProcessPipeline:
    """All ranks of a program in one process, each with its own copy of the model, as on real ranks."""

    def __init__(
        self,
        program: Program,
        seed: int = 0,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        device: str = "cpu",
        track_memory: bool = False,
    ):
        self.program = program
        self.transport = InProcessTransport()
        self.executors = []
        for rank in range(program.num_ranks):
            spec = build_spec(program, seed)
            self.executors.append(
                RankExecutor(program, rank, spec.module, self.transport, device, track_memory, seed)
            )
        self.spec = spec
        self.optimizers = [make_optimizer(optimizer, e.parameters(), lr) for e in self.executors]
        self._tied = [tied_parameters(program, e) for e in self.executors]

    def step(
        self, microbatches: list[dict[str, torch.Tensor]], update: bool = True, trace: list | None = None
    ) -> list[float]:
        """One training step; returns the per-micro-batch losses.

        With ``trace``, appends this step's timings: one list of :class:`ActionTiming` per rank, in
        seconds since the step began (for :func:`ppcompile.runtime.trace.measured_trace`). The ranks
        take turns in this process, so the timeline shows the order of actions, not their overlap.
        """
        if not self.program.trains:
            raise ProgramError(
                "this program was compiled for inference (--schedule forward-only) and returns forward's "
                "outputs, not a loss to train on; evaluate it, or compile it with a training schedule"
            )
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self._run([None] * len(self.executors), microbatches, trace)
        self.reduce_tied_gradients()
        if update:
            for opt in self.optimizers:
                opt.step()
        return self._losses()

    def evaluate(self, microbatches: list[dict[str, torch.Tensor]], trace: list | None = None) -> list[float]:
        """Forward only, without autograd, through the inference schedule; returns the per-micro-batch
        losses. Gradients and optimizer state are left alone. ``trace`` as in :meth:`step`."""
        actions = [inference_actions(self.program, e.rank) for e in self.executors]
        with torch.no_grad():
            self._run(actions, microbatches, trace)
        return self._losses()

    def _run(
        self,
        actions: list[list[Action] | None],
        microbatches: list[dict[str, torch.Tensor]],
        trace: list | None,
    ) -> None:
        """Every rank's action list (None: its training schedule), taking turns while receives wait."""
        timings: list[list[ActionTiming]] | None = None if trace is None else [[] for _ in self.executors]
        start = time.perf_counter()
        runs = [
            e.run(microbatches, a, None if timings is None else timings[e.rank])
            for e, a in zip(self.executors, actions)
        ]
        active = list(range(len(runs)))
        while active:
            sent_before = self.transport.sent
            waiting = {}
            for rank in active:
                action = next(runs[rank], None)
                if action is not None:
                    waiting[rank] = action
            if waiting and len(waiting) == len(active) and self.transport.sent == sent_before:
                # Everyone is blocked on a receive and nobody sent anything: the next round is the same.
                stuck = "; ".join(f"rank {r} waits in {a}" for r, a in sorted(waiting.items()))
                raise RuntimeError(f"deadlock: {stuck}")
            active = sorted(waiting)
        if trace is not None:
            trace.append([shift_timings(t, start) for t in timings])

    def results(self) -> list:
        """What the model's forward returned for each micro-batch of the last :meth:`evaluate`, in
        order, for a program compiled for inference (``--schedule forward-only``)."""
        last = self.executors[self.program.rank_of_stage[self.program.num_stages - 1]]
        return [last.results[m] for m in sorted(last.results)]

    def _losses(self) -> list[float]:
        losses = {}
        for e in self.executors:
            losses.update(e.losses)
        return [float(losses[m]) for m in sorted(losses)]

    def reduce_tied_gradients(self) -> None:
        for g in range(len(self.program.data["tied_parameters"])):
            params = [p for groups in self._tied for p in groups[g]]
            if not params:
                continue  # frozen
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            total = grads[0].clone()
            for grad in grads[1:]:
                total += grad
            for p in params:
                p.grad = total.clone()

    def random_states(self) -> list[torch.Tensor]:
        """Every stage's random stream as it stands, to tell whether a step drew from any."""
        return [t for e in self.executors for stream in e.random.values() for t in stream.states()]

    def memory(self) -> MemoryStats:
        """Every stage's activation counts (with ``track_memory``), gathered from all ranks."""
        merged = MemoryStats()
        for e in self.executors:
            merged.peak_live_microbatches.update(e.memory.peak_live_microbatches)
            merged.peak_bytes.update(e.memory.peak_bytes)
            merged.bytes_per_microbatch.update(e.memory.bytes_per_microbatch)
        return merged

    def named_gradients(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for e in self.executors for m in e.stages.values() for n, p in m.named_parameters()}

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for e in self.executors for m in e.stages.values() for n, p in m.named_parameters()}

    def named_buffers(self) -> dict[str, dict[int, torch.Tensor]]:
        """Every buffer the ranks hold, under the model's name, then by rank: a buffer that stages on
        two ranks read (a causal mask) has a copy on each."""
        held: dict[str, dict[int, torch.Tensor]] = {}
        for e in self.executors:
            for m in e.stages.values():
                for n, b in m.named_buffers():
                    held.setdefault(n, {})[e.rank] = b
        return held
