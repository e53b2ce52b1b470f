"""Pipeline schedules as plain data: generators, communication lowering, and the text grid.

A generator emits compute-only action lists per rank (``F`` and ``B``, or ``F``, ``I`` and ``W`` for a
split backward); ``lower_communication`` adds the sends and receives; ``ppcompile.simulate`` replays
the result to prove it deadlock-free and predict its timing.

With V virtual stages, K ranks hold K * V stages and stage i lives on rank i % K.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ppcompile.runtime.actions import COMPUTE_KINDS, Action, ActionKind

# (producer_stage, consumer_stage): the producer sends activations to the consumer in forward
# and, when the edge carries a differentiable tensor, receives gradients back in backward.
Edge = tuple[int, int]

F, B, I, W = ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W  # noqa: E741


class ScheduleError(ValueError):
    """A schedule that cannot be built or is malformed; the message is one line for the user."""


def rank_of_stage(stage: int, num_ranks: int) -> int:
    """The rank that holds ``stage``: stages are dealt round-robin, so with V virtual stages per
    rank, rank r holds stages r, r + num_ranks, r + 2 * num_ranks, ...

    Example::

        >>> rank_of_stage(5, 4)
        1
    """
    return stage % num_ranks


@dataclass(frozen=True)
class Schedule:
    """Every rank's ordered action list for one training step, plus what it was made for.

    Example::

        >>> s = one_f_one_b(num_ranks=2, microbatches=2)
        >>> [str(a) for a in s.actions[1]]
        ['1F0', '1B0', '1F1', '1B1']
    """

    name: str
    num_ranks: int
    num_stages: int
    microbatches: int
    # rank -> actions in execution order; every rank in range(num_ranks) has an entry.
    actions: dict[int, tuple[Action, ...]]

    def __post_init__(self) -> None:
        if sorted(self.actions) != list(range(self.num_ranks)):
            raise ScheduleError(
                f"schedule {self.name!r} has action lists for ranks {sorted(self.actions)}, "
                f"expected exactly ranks 0..{self.num_ranks - 1}"
            )
        for rank, actions in self.actions.items():
            for action in actions:
                if not 0 <= action.stage < self.num_stages:
                    raise ScheduleError(
                        f"schedule {self.name!r}: action {action} on rank {rank} names a stage "
                        f"outside 0..{self.num_stages - 1}"
                    )
                if self.rank_of_stage(action.stage) != rank:
                    raise ScheduleError(
                        f"schedule {self.name!r}: action {action} is on rank {rank} but stage "
                        f"{action.stage} lives on rank {self.rank_of_stage(action.stage)}"
                    )
                if action.microbatch is not None and action.microbatch >= self.microbatches:
                    raise ScheduleError(
                        f"schedule {self.name!r}: action {action} names microbatch {action.microbatch} "
                        f"but there are only {self.microbatches}"
                    )

    def rank_of_stage(self, stage: int) -> int:
        """The rank that runs ``stage`` in this schedule."""
        return rank_of_stage(stage, self.num_ranks)

    @property
    def virtual_stages(self) -> int:
        """V, the number of stages each rank holds (stages per rank, rounded up).

        Example::

            >>> make_schedule("interleaved-1f1b", 2, 4, virtual_stages=3).virtual_stages
            3
        """
        return -(-self.num_stages // self.num_ranks)

    def stages_of_rank(self, rank: int) -> list[int]:
        """The stages ``rank`` holds, in order.

        Example::

            >>> make_schedule("interleaved-1f1b", 4, 4, virtual_stages=2).stages_of_rank(1)
            [1, 5]
        """
        return list(range(rank, self.num_stages, self.num_ranks))


def _check_sizes(name: str, num_ranks: int, microbatches: int, virtual_stages: int) -> None:
    if num_ranks < 1 or microbatches < 1 or virtual_stages < 1:
        raise ScheduleError(
            f"schedule {name!r} needs at least 1 rank, 1 microbatch and 1 virtual stage per rank, "
            f"got K={num_ranks} ranks, M={microbatches} microbatches and V={virtual_stages}"
        )


def _require_one_stage_per_rank(name: str, virtual_stages: int) -> None:
    if virtual_stages != 1:
        raise ScheduleError(
            f"{name} runs one stage per rank, got V={virtual_stages} virtual stages; "
            f"use V=1, or the interleaved-1f1b schedule for V >= 2"
        )


def _require_microbatches_at_least_ranks(name: str, num_ranks: int, microbatches: int) -> None:
    if microbatches < num_ranks:
        raise ScheduleError(
            f"{name} needs at least as many microbatches as ranks: got M={microbatches} for K={num_ranks}; "
            f"use M >= {num_ranks}"
        )


def _build(name: str, num_ranks: int, microbatches: int, virtual_stages: int, per_rank: Callable) -> Schedule:
    actions = {rank: tuple(per_rank(rank)) for rank in range(num_ranks)}
    return Schedule(
        name,
        num_ranks=num_ranks,
        num_stages=num_ranks * virtual_stages,
        microbatches=microbatches,
        actions=actions,
    )


def _one_forward_one_backward(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """``warmup`` forwards, then alternate the next forward and the next backward, then the rest of
    the backwards: the shape shared by 1F1B and interleaved 1F1B.

    Example::

        >>> fs = [Action(0, F, m) for m in range(3)]
        >>> bs = [Action(0, B, m) for m in range(3)]
        >>> [str(a) for a in _one_forward_one_backward(fs, bs, warmup=1)]
        ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
    """
    steady = len(forwards) - warmup
    actions = forwards[:warmup]
    for i in range(steady):
        actions += [forwards[warmup + i], backwards[i]]
    return actions + backwards[steady:]


def gpipe(num_ranks: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """GPipe (fill-drain): every forward in microbatch order, then every backward in microbatch order,
    as torch's ``ScheduleGPipe`` does. Keeps all M microbatches' activations alive at once.

    Example::

        >>> [str(a) for a in gpipe(2, 2).actions[0]]
        ['0F0', '0F1', '0B0', '0B1']
    """
    _check_sizes("gpipe", num_ranks, microbatches, virtual_stages)
    _require_one_stage_per_rank("gpipe", virtual_stages)

    def per_rank(stage: int) -> list[Action]:
        forwards = [Action(stage, F, m) for m in range(microbatches)]
        backwards = [Action(stage, B, m) for m in range(microbatches)]
        return forwards + backwards

    return _build("gpipe", num_ranks, microbatches, virtual_stages, per_rank)


def one_f_one_b(num_ranks: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """1F1B (PipeDream-Flush): stage s runs K - s - 1 warmup forwards, then alternates one forward
    and one backward, then drains the remaining backwards. Stage s keeps at most K - s microbatches
    of activations alive, where GPipe keeps M.

    Example::

        >>> [str(a) for a in one_f_one_b(2, 3).actions[0]]
        ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
    """
    _check_sizes("1f1b", num_ranks, microbatches, virtual_stages)
    _require_one_stage_per_rank("1f1b", virtual_stages)
    _require_microbatches_at_least_ranks("1f1b", num_ranks, microbatches)

    def per_rank(stage: int) -> list[Action]:
        forwards = [Action(stage, F, m) for m in range(microbatches)]
        backwards = [Action(stage, B, m) for m in range(microbatches)]
        return _one_forward_one_backward(forwards, backwards, warmup=num_ranks - stage - 1)

    return _build("1f1b", num_ranks, microbatches, virtual_stages, per_rank)


def _nearest_multiples(value: int, factor: int) -> str:
    """The multiples of ``factor`` around ``value``, for error messages: ``"M=4 or 8"``."""
    below = value // factor * factor
    return f"M={below} or {below + factor}" if below else f"M={factor}"


def _chunk_order(
    num_ranks: int, microbatches: int, virtual_stages: int, rank: int, kind: ActionKind
) -> list[Action]:
    """The order in which interleaved 1F1B visits (stage, microbatch) on ``rank``.

    Microbatches go in rounds of K: the K microbatches of a round pass through the rank's first
    chunk, then its second, ... (Megatron-LM's "depth first" order). Backwards visit the chunks
    from the last to the first. Needs M to be a multiple of K.

    Example::

        >>> [str(a) for a in _chunk_order(2, 2, 2, rank=1, kind=F)]
        ['1F0', '1F1', '3F0', '3F1']
    """
    ops = []
    for i in range(microbatches * virtual_stages):
        chunk = (i // num_ranks) % virtual_stages
        if kind != F:
            chunk = virtual_stages - 1 - chunk
        microbatch = i // (num_ranks * virtual_stages) * num_ranks + i % num_ranks
        ops.append(Action(chunk * num_ranks + rank, kind, microbatch))
    return ops


def interleaved_one_f_one_b(num_ranks: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Megatron-LM's interleaved 1F1B (Narayanan et al., 2021), as torch's ``ScheduleInterleaved1F1B``
    builds it: rank r holds V chunks (stages r, r + K, ...), runs (V - 1) * K + 2 * (K - r - 1)
    warmup forwards, then alternates forward and backward. Chunks of 1/V of the work divide the
    bubble by V: (K - 1) / (V * M + K - 1) with equal stages.

    Example::

        >>> [str(a) for a in interleaved_one_f_one_b(2, 2, virtual_stages=2).actions[1]]
        ['1F0', '1F1', '3F0', '3B0', '3F1', '3B1', '1B0', '1B1']
    """
    name = "interleaved-1f1b"
    _check_sizes(name, num_ranks, microbatches, virtual_stages)
    if virtual_stages < 2:
        raise ScheduleError(
            f"{name} needs V >= 2 virtual stages per rank, got V={virtual_stages}; "
            f"use V=2 or more, or the 1f1b schedule for V=1"
        )
    if microbatches % num_ranks:
        # Megatron-LM's constraint: a round of K microbatches fills exactly one chunk of every rank.
        raise ScheduleError(
            f"{name} needs M to be a multiple of K={num_ranks}; got M={microbatches}; "
            f"use {_nearest_multiples(microbatches, num_ranks)}"
        )

    def per_rank(rank: int) -> list[Action]:
        chunk_ops = microbatches * virtual_stages
        # Enough forwards that the first backward of the last chunk is due when this rank is free;
        # two extra per hop from the last rank, as that backward travels back and forth.
        warmup = min((virtual_stages - 1) * num_ranks + 2 * (num_ranks - rank - 1), chunk_ops)
        forwards = _chunk_order(num_ranks, microbatches, virtual_stages, rank, F)
        backwards = _chunk_order(num_ranks, microbatches, virtual_stages, rank, B)
        return _one_forward_one_backward(forwards, backwards, warmup)

    return _build(name, num_ranks, microbatches, virtual_stages, per_rank)


def zero_bubble_h1(num_ranks: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """ZB-H1 (Qi et al., ICLR 2024, "Zero Bubble Pipeline Parallelism"): 1F1B with each backward split
    into I (input grad, on the critical path) and W (weight grad, deferred). Stage s delays its
    W's by s steps, so the W's fill the drain's bubbles. With F = I = W the bubble is a third of
    1F1B's: (K - 1)(F + I - W) idle per rank instead of (K - 1)(F + I + W). Deferred W's hold
    activations, so every stage peaks at K live microbatches: 1F1B's peak on stage 0.

    Example::

        >>> [str(a) for a in zero_bubble_h1(2, 2).actions[1]]
        ['1F0', '1I0', '1F1', '1I1', '1W0', '1W1']
    """
    name = "zb-h1"
    _check_sizes(name, num_ranks, microbatches, virtual_stages)
    _require_one_stage_per_rank(name, virtual_stages)
    _require_microbatches_at_least_ranks(name, num_ranks, microbatches)

    def per_rank(stage: int) -> list[Action]:
        forwards = [Action(stage, F, m) for m in range(microbatches)]
        inputs = [Action(stage, I, m) for m in range(microbatches)]
        ordered = _one_forward_one_backward(forwards, inputs, warmup=num_ranks - stage - 1)
        actions: list[Action] = []
        weights_done = 0
        for action in ordered:
            actions.append(action)
            # The W of microbatch m - s follows the I of microbatch m (torch's ZB1P at V=1).
            if action.kind == I and action.microbatch >= stage:
                actions.append(Action(stage, W, weights_done))
                weights_done += 1
        return actions + [Action(stage, W, m) for m in range(weights_done, microbatches)]

    return _build(name, num_ranks, microbatches, virtual_stages, per_rank)


def forward_only(num_ranks: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Inference: forwards only, no backward, any M >= 1. With V > 1 the forwards follow interleaved
    1F1B's order (rounds of K microbatches through each chunk in turn).

    Example::

        >>> [str(a) for a in forward_only(2, 3).actions[1]]
        ['1F0', '1F1', '1F2']
    """
    name = "forward-only"
    _check_sizes(name, num_ranks, microbatches, virtual_stages)

    def per_rank(rank: int) -> list[Action]:
        rounds = -(-microbatches // num_ranks)
        # Pad to whole rounds of K, then drop the padding: a partial last round keeps the order.
        padded = _chunk_order(num_ranks, rounds * num_ranks, virtual_stages, rank, F)
        return [action for action in padded if action.microbatch < microbatches]

    return _build(name, num_ranks, microbatches, virtual_stages, per_rank)


# Every generator takes (num_ranks, microbatches, virtual_stages) and returns compute actions only.
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_one_f_one_b,
    "zb-h1": zero_bubble_h1,
    "forward-only": forward_only,
}


def make_schedule(name: str, num_ranks: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Build a schedule by its registered name for K = ``num_ranks`` ranks holding V =
    ``virtual_stages`` stages each (K * V stages in all; with V = 1, K is also the stage count).

    Example::

        >>> make_schedule("1f1b", 4, 8).num_stages
        4
        >>> make_schedule("interleaved-1f1b", 4, 8, virtual_stages=2).num_stages
        8
    """
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; known schedules: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](num_ranks, microbatches, virtual_stages)


def linear_edges(num_stages: int) -> set[Edge]:
    """The edges of a plain chain of stages, 0 -> 1 -> ... -> K-1.

    Example::

        >>> sorted(linear_edges(3))
        [(0, 1), (1, 2)]
    """
    return {(stage, stage + 1) for stage in range(num_stages - 1)}


def check_edges(num_stages: int, edges: Iterable[Edge], grad_edges: Iterable[Edge]) -> None:
    """Raise ScheduleError unless every edge runs forward between existing stages and every
    gradient edge is also a forward edge."""
    edges = set(edges)
    for producer, consumer in edges:
        if not 0 <= producer < consumer < num_stages:
            raise ScheduleError(
                f"edge ({producer}, {consumer}) must run from an earlier stage to a later one "
                f"within 0..{num_stages - 1}"
            )
    stray = sorted(set(grad_edges) - edges)
    if stray:
        raise ScheduleError(
            f"gradient edges {stray} are not forward edges; grad_edges must be a subset of edges"
        )


def lower_communication(
    schedule: Schedule, edges: Iterable[Edge], grad_edges: Iterable[Edge] | None = None
) -> Schedule:
    """Add the sends and receives a compute-only schedule implies.

    ``edges`` are the (producer, consumer) stage pairs that carry activations, including skip
    connections between non-adjacent stages; ``grad_edges`` (default: all of ``edges``) are those
    that carry a differentiable tensor and so need a gradient back. One SEND or RECV stands for all
    of its stage's messages for that microbatch; the runtime batches them.

    Example::

        >>> lowered = lower_communication(gpipe(2, 1), {(0, 1)})
        >>> [str(a) for a in lowered.actions[1]]
        ['1RECV_F0', '1F0', '1B0', '1SEND_B0']
    """
    edges = set(edges)
    grad_edges = edges if grad_edges is None else set(grad_edges)
    check_edges(schedule.num_stages, edges, grad_edges)
    receives_activations = {consumer for _, consumer in edges}
    sends_activations = {producer for producer, _ in edges}
    receives_grads = {producer for producer, _ in grad_edges}
    sends_grads = {consumer for _, consumer in grad_edges}

    def lower_rank(actions: tuple[Action, ...]) -> tuple[Action, ...]:
        lowered: list[Action] = []
        for action in actions:
            if not action.is_compute:
                raise ScheduleError(f"lower_communication expects compute actions only, got {action}")
            stage, m = action.stage, action.microbatch
            # I produces the input grads, so it is the half of a split backward that talks to peers.
            if action.kind == F and stage in receives_activations:
                lowered.append(Action(stage, ActionKind.RECV_F, m))
            if action.kind in (B, I) and stage in receives_grads:
                lowered.append(Action(stage, ActionKind.RECV_B, m))
            lowered.append(action)
            if action.kind == F and stage in sends_activations:
                lowered.append(Action(stage, ActionKind.SEND_F, m))
            if action.kind in (B, I) and stage in sends_grads:
                lowered.append(Action(stage, ActionKind.SEND_B, m))
        return tuple(lowered)

    return Schedule(
        name=schedule.name,
        num_ranks=schedule.num_ranks,
        num_stages=schedule.num_stages,
        microbatches=schedule.microbatches,
        actions={rank: lower_rank(actions) for rank, actions in schedule.actions.items()},
    )


def format_schedule_grid(schedule: Schedule, include_communication: bool = False) -> str:
    """The human-readable ``schedule.txt``: a header, then one row per rank, one column per step.

    Columns are action order on each rank, not time; ``ppcompile.simulate`` gives timing.

    Example::

        >>> print(format_schedule_grid(gpipe(2, 2)), end="")
        # gpipe: 2 stages on 2 ranks, 2 microbatches; compute actions only
        step    0   1   2   3
        rank 0  0F0 0F1 0B0 0B1
        rank 1  1F0 1F1 1B0 1B1
    """
    rows = {
        rank: [str(a) for a in schedule.actions[rank] if include_communication or a.kind in COMPUTE_KINDS]
        for rank in range(schedule.num_ranks)
    }
    num_columns = max((len(row) for row in rows.values()), default=0)
    labels = {rank: f"rank {rank}" for rank in rows}
    label_width = max([len("step"), *(len(label) for label in labels.values())])
    # One width for every column keeps the grid regular even when a row holds long RECV/SEND names.
    cell_width = max([len(str(num_columns - 1)), *(len(cell) for row in rows.values() for cell in row)])

    def line(label: str, cells: list[str]) -> str:
        padded = [cell.ljust(cell_width) for cell in cells]
        return (label.ljust(label_width) + "  " + " ".join(padded)).rstrip()

    shown = "all actions" if include_communication else "compute actions only"
    header = (
        f"# {schedule.name}: {schedule.num_stages} stages on {schedule.num_ranks} ranks, "
        f"{schedule.microbatches} microbatches; {shown}"
    )
    lines = [header, line("step", [str(column) for column in range(num_columns)])]
    lines += [line(labels[rank], rows[rank]) for rank in sorted(rows)]
    return "\n".join(lines) + "\n"
