"""Replay every rank's lowered action list to prove a schedule deadlock-free and predict its timing.

Semantics, matching the runtime: each rank runs its actions in order, one at a time. Compute
actions take their stage's cost. A SEND is non-blocking (an ``isend``): it costs the sender
``send_cost`` per message (its own call, zero by default) and its messages arrive at ``send time
+ transfer time``. A RECV blocks until every message it stands for has arrived. Arithmetic
follows the cost type, so ``Fraction`` (or ``int``) costs give exact results, ratios included.

Memory is counted in microbatch activations per stage: a microbatch's activations are alive on a
stage from the start of its F to the end of its B, or of its W when the backward is split. An F
with no backward anywhere in the schedule (inference) frees its activations when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational

from ppcompile.runtime.actions import Action, ActionKind
from ppcompile.schedules import Edge, Schedule, ScheduleError, check_edges

# transfer_time(producer_stage, consumer_stage, direction) -> seconds for one message on that
# edge; direction is SEND_F for activations (producer -> consumer) and SEND_B for gradients
# (consumer -> producer).
TransferTime = Callable[[int, int, ActionKind], float]


class DeadlockError(RuntimeError):
    """No rank can make progress while some still have actions left."""


class DependencyError(ScheduleError):
    """An action runs before something it needs, e.g. a backward before its forward."""


@dataclass(frozen=True)
class StageCosts:
    """Predicted seconds for one microbatch on one stage.

    Example::

        >>> StageCosts(forward=1.0, backward=2.0)
        StageCosts(forward=1.0, backward=2.0, backward_input=None, backward_weight=None)
        >>> StageCosts(forward=1.0, backward=2.0).split_backward()
        (1.0, 1.0)
    """

    forward: float
    # The full backward, B.
    backward: float
    # The two halves of a split backward (I and W), used by schedules that emit them. A missing
    # half is what the other leaves of B; with neither given, each is half of B.
    backward_input: float | None = None
    backward_weight: float | None = None

    def split_backward(self) -> tuple[float, float]:
        """The (I, W) costs, filling in missing halves from ``backward``."""
        given_input, given_weight = self.backward_input, self.backward_weight
        if given_input is None and given_weight is None:
            half = _ratio(self.backward, 2)
            return half, half
        if given_input is None:
            return self.backward - given_weight, given_weight
        if given_weight is None:
            return given_input, self.backward - given_input
        return given_input, given_weight


@dataclass(frozen=True)
class TimelineEvent:
    """One action as it ran; for a RECV, ``end - start`` is the time spent waiting."""

    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    """What one simulated step predicts."""

    step_time: float
    # Per rank: seconds spent in compute actions.
    busy_time: tuple[float, ...]
    # Per rank: idle / step_time.
    bubble_fraction: tuple[float, ...]
    # 1 - sum(busy) / (num_ranks * step_time).
    overall_bubble_fraction: float
    # Per stage: the most microbatches whose activations are alive at once (from the start of
    # a microbatch's F to the end of its B, or of its W for a split backward).
    peak_live_microbatches: tuple[int, ...]
    # Per rank: the most microbatch activations alive at once summed over the rank's stages; with
    # V virtual stages each counts one stage's (about 1/V of the rank's layers).
    peak_live_per_rank: tuple[int, ...]
    # Every action, grouped by rank, in execution order.
    events: tuple[TimelineEvent, ...]


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, exact (a Fraction) when both are ints or Fractions.

    Example::

        >>> _ratio(1, 3), _ratio(1.0, 4)
        (Fraction(1, 3), 0.25)
    """
    if isinstance(numerator, Rational) and isinstance(denominator, Rational):
        return Fraction(numerator, denominator)
    return numerator / denominator


def free_transfer(producer: int, consumer: int, direction: ActionKind) -> float:
    """The default transfer time: communication is free."""
    return 0


def per_edge_transfer(forward: dict[Edge, float], backward: dict[Edge, float] | None = None) -> TransferTime:
    """A transfer-time function from per-edge tables; edges missing from a table cost 0.

    Example::

        >>> transfer = per_edge_transfer({(0, 2): 0.5})
        >>> transfer(0, 2, ActionKind.SEND_F), transfer(0, 2, ActionKind.SEND_B)
        (0.5, 0)
    """
    backward = backward or {}

    def transfer_time(producer: int, consumer: int, direction: ActionKind) -> float:
        table = forward if direction == ActionKind.SEND_F else backward
        return table.get((producer, consumer), 0)

    return transfer_time


def simulate(
    schedule: Schedule,
    costs: Sequence[StageCosts],
    edges: Iterable[Edge],
    grad_edges: Iterable[Edge] | None = None,
    transfer_time: TransferTime = free_transfer,
    send_cost: float = 0,
    idle_transfer_time: TransferTime | None = None,
    speedups: Mapping[Action, float] | None = None,
    start_times: Mapping[int, float] | None = None,
    duration_factor: Callable[[Action], float] | None = None,
) -> SimResult:
    """Replay a lowered schedule. ``costs[s]`` is stage s's cost; ``edges`` and ``grad_edges``
    (default: all of ``edges``) must be the ones the schedule was lowered with. A compute action
    in ``speedups`` takes its stage's cost divided by its factor (it runs on spare cores). A rank
    in ``start_times`` begins its first action that late (the runtime posts the step's receives
    first); the others at 0. ``duration_factor(action)``, where given, multiplies each compute
    action's cost (one draw of a machine's jitter, see ``replay.simulate_program``).

    Raises DeadlockError if the ranks get stuck, DependencyError if an action runs before what it
    needs (B before F, F before its RECV_F, ...).

    Example::

        >>> from ppcompile.schedules import gpipe, lower_communication
        >>> lowered = lower_communication(gpipe(2, 2), {(0, 1)})
        >>> simulate(lowered, [StageCosts(1, 2)] * 2, {(0, 1)}).step_time
        9
    """
    edges = set(edges)
    grad_edges = edges if grad_edges is None else set(grad_edges)
    check_edges(schedule.num_stages, edges, grad_edges)
    if len(costs) != schedule.num_stages:
        raise ValueError(f"need costs for {schedule.num_stages} stages, got {len(costs)}")
    replay = _Replay(
        schedule,
        costs,
        edges,
        grad_edges,
        transfer_time,
        send_cost,
        idle_transfer_time,
        speedups or {},
        duration_factor,
        start_times or {},
    )
    replay.run()
    return replay.result()


class _Replay:
    """The mutable state of one simulation; ``simulate`` is its only user."""

    def __init__(
        self,
        schedule: Schedule,
        costs: Sequence[StageCosts],
        edges: set[Edge],
        grad_edges: set[Edge],
        transfer_time: TransferTime,
        send_cost: float,
        idle_transfer_time: TransferTime | None,
        speedups: Mapping[Action, float],
        duration_factor: Callable[[Action], float] | None,
        start_times: Mapping[int, float],
    ) -> None:
        self.schedule = schedule
        self.costs = costs
        self.transfer_time = transfer_time
        self.send_cost = send_cost
        self.idle_transfer_time = idle_transfer_time
        self.speedups = speedups
        self.duration_factor = duration_factor
        stages = range(schedule.num_stages)
        # Peers each stage sends to / receives from, per direction of travel.
        self.peers = {
            ActionKind.SEND_F: {s: sorted(c for p, c in edges if p == s) for s in stages},
            ActionKind.RECV_F: {s: sorted(p for p, c in edges if c == s) for s in stages},
            ActionKind.SEND_B: {s: sorted(p for p, c in grad_edges if c == s) for s in stages},
            ActionKind.RECV_B: {s: sorted(c for p, c in grad_edges if p == s) for s in stages},
        }
        ranks = range(schedule.num_ranks)
        self.clock = {rank: start_times.get(rank, 0) for rank in ranks}
        self.next_index = {rank: 0 for rank in ranks}
        self.busy = {rank: 0 for rank in ranks}
        self.events: dict[int, list[TimelineEvent]] = {rank: [] for rank in ranks}
        # (direction, sender stage, receiver stage, microbatch) -> (send time, edge, direction),
        # until received; the arrival follows from them and from when the receiver waits.
        self.in_flight: dict[tuple[ActionKind, int, int, int], tuple[float, Edge, ActionKind]] = {}
        # (stage, kind, microbatch) for every action already run, to check dependencies.
        self.done: set[tuple[int, ActionKind, int | None]] = set()
        self.live = [0] * schedule.num_stages
        self.peak_live = [0] * schedule.num_stages
        self.rank_live = {rank: 0 for rank in ranks}
        self.rank_peak_live = {rank: 0 for rank in ranks}
        # (stage, microbatch) pairs whose activations wait for a backward; the others free at once.
        self.trained = {
            (a.stage, a.microbatch)
            for actions in schedule.actions.values()
            for a in actions
            if a.kind in (ActionKind.B, ActionKind.I, ActionKind.W)
        }

    def run(self) -> None:
        # Sends never block, so a rank can only wait at a RECV; running each rank as far as it
        # can and repeating until nothing moves reaches the same times as any event ordering.
        progressed = True
        while progressed:
            progressed = False
            for rank, actions in self.schedule.actions.items():
                while self.next_index[rank] < len(actions):
                    action = actions[self.next_index[rank]]
                    if self._missing_senders(action):
                        break
                    self._execute(rank, action)
                    self.next_index[rank] += 1
                    progressed = True
        self._check_finished()

    def _missing_senders(self, action: Action) -> list[int]:
        """Peer stages whose message for this RECV has not been sent yet (empty for other kinds)."""
        if action.kind == ActionKind.RECV_F:
            direction = ActionKind.SEND_F
        elif action.kind == ActionKind.RECV_B:
            direction = ActionKind.SEND_B
        else:
            return []
        return [
            peer
            for peer in self.peers[action.kind][action.stage]
            if (direction, peer, action.stage, action.microbatch) not in self.in_flight
        ]

    def _execute(self, rank: int, action: Action) -> None:
        start = self.clock[rank]
        if action.is_compute:
            self._check_compute_dependencies(action)
            end = start + self._compute_cost(action)
            self.busy[rank] += end - start
            self._track_live_activations(rank, action)
        elif action.kind in (ActionKind.SEND_F, ActionKind.SEND_B):
            end = start + self.send_cost * len(self.peers[action.kind][action.stage])
            self._send(action, start)
        elif action.kind in (ActionKind.RECV_F, ActionKind.RECV_B):
            end = max([start, *self._receive(action, start)])
        else:
            # REDUCE_GRAD and OPT: collective / local work the cost model does not price yet.
            end = start
        self.done.add((action.stage, action.kind, action.microbatch))
        self.clock[rank] = end
        self.events[rank].append(TimelineEvent(rank, action, start, end))

    def _compute_cost(self, action: Action) -> float:
        costs = self.costs[action.stage]
        if action.kind == ActionKind.F:
            cost = costs.forward
        elif action.kind == ActionKind.B:
            cost = costs.backward
        else:
            input_grad, weight_grad = costs.split_backward()
            cost = input_grad if action.kind == ActionKind.I else weight_grad
        if self.duration_factor is not None:
            cost = cost * self.duration_factor(action)
        return cost / self.speedups[action] if action in self.speedups else cost

    def _require(self, action: Action, kind: ActionKind, why: str) -> None:
        if (action.stage, kind, action.microbatch) not in self.done:
            needed = Action(action.stage, kind, action.microbatch)
            raise DependencyError(f"schedule {self.schedule.name!r}: {action} runs before {needed}: {why}")

    def _check_compute_dependencies(self, action: Action) -> None:
        stage, kind = action.stage, action.kind
        if (stage, kind, action.microbatch) in self.done:
            raise DependencyError(f"schedule {self.schedule.name!r}: {action} runs twice")
        if kind == ActionKind.F and self.peers[ActionKind.RECV_F][stage]:
            self._require(action, ActionKind.RECV_F, "the forward needs its inputs")
        if kind in (ActionKind.B, ActionKind.I):
            self._require(action, ActionKind.F, "the backward needs the forward's activations")
            split = ActionKind.I if kind == ActionKind.B else ActionKind.B
            if (stage, split, action.microbatch) in self.done:
                raise DependencyError(f"schedule {self.schedule.name!r}: {action} mixes B with I/W")
            if self.peers[ActionKind.RECV_B][stage]:
                self._require(action, ActionKind.RECV_B, "the backward needs its output gradients")
        if kind == ActionKind.W:
            self._require(action, ActionKind.I, "the weight gradient follows the input gradient")

    def _track_live_activations(self, rank: int, action: Action) -> None:
        # Only this rank's own actions change its stages' counts, so tracking them in the rank's
        # program order gives the true peaks whatever order the replay visits ranks in.
        stage = action.stage
        if action.kind == ActionKind.F:
            self._add_live(rank, stage, 1)
            if (stage, action.microbatch) not in self.trained:
                self._add_live(rank, stage, -1)
        elif action.kind in (ActionKind.B, ActionKind.W):
            self._add_live(rank, stage, -1)

    def _add_live(self, rank: int, stage: int, delta: int) -> None:
        self.live[stage] += delta
        self.rank_live[rank] += delta
        self.peak_live[stage] = max(self.peak_live[stage], self.live[stage])
        self.rank_peak_live[rank] = max(self.rank_peak_live[rank], self.rank_live[rank])

    def _send(self, action: Action, now: float) -> None:
        stage, m = action.stage, action.microbatch
        peers = self.peers[action.kind][stage]
        if not peers:
            raise DependencyError(
                f"schedule {self.schedule.name!r}: {action} but stage {stage} has no peers to send to"
            )
        if action.kind == ActionKind.SEND_F:
            self._require(action, ActionKind.F, "it sends the forward's outputs")
        elif (stage, ActionKind.B, m) not in self.done:
            self._require(action, ActionKind.I, "it sends the backward's input gradients")
        for peer in peers:
            key = (action.kind, stage, peer, m)
            if key in self.in_flight:
                raise DependencyError(
                    f"schedule {self.schedule.name!r}: {action} sends to stage {peer} twice"
                )
            # The edge is named (producer, consumer) whichever way the message travels.
            edge = (stage, peer) if action.kind == ActionKind.SEND_F else (peer, stage)
            self.in_flight[key] = (now, edge, action.kind)

    def _receive(self, action: Action, start: float) -> list[float]:
        """Consume this RECV's messages and return their arrival times; ``start`` is when the rank
        begins to wait. With ``idle_transfer_time``, a message the receiver waits for lands that
        long after it was sent or the wait began, whichever is later, if that is sooner: a rank
        blocked on a receive leaves its core to the threads that move the message."""
        peers = self.peers[action.kind][action.stage]
        if not peers:
            raise DependencyError(
                f"schedule {self.schedule.name!r}: {action} but stage {action.stage} has no peers to receive from"
            )
        direction = ActionKind.SEND_F if action.kind == ActionKind.RECV_F else ActionKind.SEND_B
        arrivals = []
        for peer in peers:
            sent, edge, kind = self.in_flight.pop((direction, peer, action.stage, action.microbatch))
            arrival = sent + self.transfer_time(*edge, kind)
            if self.idle_transfer_time is not None:
                arrival = min(arrival, max(sent, start) + self.idle_transfer_time(*edge, kind))
            arrivals.append(arrival)
        return arrivals

    def _check_finished(self) -> None:
        stuck = []
        for rank, actions in self.schedule.actions.items():
            if self.next_index[rank] < len(actions):
                action = actions[self.next_index[rank]]
                waits_for = ", ".join(
                    f"stage {peer} (rank {self.schedule.rank_of_stage(peer)})"
                    for peer in self._missing_senders(action)
                )
                stuck.append(f"rank {rank} is stuck at {action} waiting for {waits_for}")
        if stuck:
            raise DeadlockError(f"schedule {self.schedule.name!r} deadlocks: {'; '.join(stuck)}")
        if self.in_flight:
            unreceived = ", ".join(
                f"{direction.value} stage {sender} -> stage {receiver} microbatch {m}"
                for direction, sender, receiver, m in sorted(self.in_flight)
            )
            raise DependencyError(
                f"schedule {self.schedule.name!r}: messages sent but never received: {unreceived}"
            )

    def result(self) -> SimResult:
        ranks = range(self.schedule.num_ranks)
        step_time = max(self.clock.values())
        busy = tuple(self.busy[rank] for rank in ranks)
        if step_time == 0:
            # Nothing costs anything, so nothing is idle either.
            bubbles, overall = tuple(0 for _ in ranks), 0
        else:
            bubbles = tuple(_ratio(step_time - busy[rank], step_time) for rank in ranks)
            overall = 1 - _ratio(sum(busy), len(busy) * step_time)
        return SimResult(
            step_time=step_time,
            busy_time=busy,
            bubble_fraction=bubbles,
            overall_bubble_fraction=overall,
            peak_live_microbatches=tuple(self.peak_live),
            peak_live_per_rank=tuple(self.rank_peak_live[rank] for rank in ranks),
            events=tuple(event for rank in ranks for event in self.events[rank]),
        )
