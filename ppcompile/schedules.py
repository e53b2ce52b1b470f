"""Pipeline schedules as plain data: generators, communication lowering, and the text grid.

A generator emits compute-only action lists per rank (``F`` and ``B``); ``lower_communication``
adds the sends and receives; ``ppcompile.simulate`` replays the result to prove it deadlock-free.
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

        >>> s = one_f_one_b(num_stages=2, microbatches=2)
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


def _check_sizes(name: str, num_stages: int, microbatches: int) -> None:
    if num_stages < 1 or microbatches < 1:
        raise ScheduleError(
            f"schedule {name!r} needs at least 1 stage and 1 microbatch, "
            f"got {num_stages} stages and {microbatches} microbatches"
        )


def _one_stage_per_rank(name: str, num_stages: int, microbatches: int, per_stage: Callable) -> Schedule:
    actions = {stage: tuple(per_stage(stage)) for stage in range(num_stages)}
    return Schedule(
        name, num_ranks=num_stages, num_stages=num_stages, microbatches=microbatches, actions=actions
    )


def gpipe(num_stages: int, microbatches: int) -> Schedule:
    """GPipe (fill-drain): every forward in microbatch order, then every backward in microbatch order,
    as torch's ``ScheduleGPipe`` does. Keeps all M microbatches' activations alive at once.

    Example::

        >>> [str(a) for a in gpipe(2, 2).actions[0]]
        ['0F0', '0F1', '0B0', '0B1']
    """
    _check_sizes("gpipe", num_stages, microbatches)

    def per_stage(stage: int) -> list[Action]:
        forwards = [Action(stage, F, m) for m in range(microbatches)]
        backwards = [Action(stage, B, m) for m in range(microbatches)]
        return forwards + backwards

    return _one_stage_per_rank("gpipe", num_stages, microbatches, per_stage)


def one_f_one_b(num_stages: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-Flush): stage s runs K - s - 1 warmup forwards, then alternates one forward
    and one backward, then drains the remaining backwards. Stage s keeps at most K - s microbatches
    of activations alive, where GPipe keeps M.

    Example::

        >>> [str(a) for a in one_f_one_b(2, 3).actions[0]]
        ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
    """
    _check_sizes("1f1b", num_stages, microbatches)
    if microbatches < num_stages:
        raise ScheduleError(
            f"1f1b needs microbatches >= stages: got M={microbatches} microbatches for K={num_stages} "
            f"stages; M must be >= K (the number of stages)"
        )

    def per_stage(stage: int) -> list[Action]:
        warmup = num_stages - stage - 1
        actions = [Action(stage, F, m) for m in range(warmup)]
        # Steady state: the forward of microbatch m + warmup, then the backward of microbatch m.
        for m in range(microbatches - warmup):
            actions += [Action(stage, F, m + warmup), Action(stage, B, m)]
        actions += [Action(stage, B, m) for m in range(microbatches - warmup, microbatches)]
        return actions

    return _one_stage_per_rank("1f1b", num_stages, microbatches, per_stage)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name: str, num_stages: int, microbatches: int) -> Schedule:
    """Build a schedule by its registered name.

    Example::

        >>> make_schedule("1f1b", num_stages=4, microbatches=8).num_ranks
        4
    """
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; known schedules: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](num_stages, microbatches)


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
