"""Replay a compiled program's schedule in the simulator, from ``program.json`` alone.

``ppcompile simulate DIR`` uses it to predict one step (time, bubble, activations in flight)
and to draw the timeline; benchmarks use it to set predictions beside measurements.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Sequence

from ppcompile.devices import get_profile
from ppcompile.runtime.actions import Action, ActionKind, parse_rank_actions
from ppcompile.runtime.executor import dtype_of, evaluate_dim
from ppcompile.schedules import Schedule
from ppcompile.simulate import SimResult, StageCosts, simulate


def program_schedule(program: dict, key: str = "schedule") -> Schedule:
    data = program[key]
    ranks = {int(r): tuple(parse_rank_actions(text)) for r, text in data["ranks"].items()}
    return Schedule(
        name=data["name"],
        num_ranks=len(ranks),
        num_stages=len(program["stages"]),
        microbatches=data["microbatches"],
        actions=ranks,
    )


def boundary_bytes(program: dict, boundary: dict) -> int:
    """One message's bytes at the micro-batch shape the program was costed for."""
    numel = math.prod(evaluate_dim(d, program["symbols"]) for d in boundary["shape"])
    return numel * dtype_of(boundary["dtype"]).itemsize


def predicted_stage_costs(program: dict) -> dict[int, StageCosts]:
    """Per stage, the compiler's predicted seconds per micro-batch (recomputation included): the
    stages timed whole where ``--profile`` calibrated them, else the sum of their nodes."""
    calibrated = program["costs"].get("calibrated")
    if calibrated is not None:
        return {
            s["stage"]: StageCosts(
                s["forward_seconds"],
                s["backward_seconds"],
                s["backward_input_seconds"],
                s["backward_weight_seconds"],
            )
            for s in calibrated["stages"]
        }
    recompute = recompute_seconds(program)
    return {
        s["stage"]: StageCosts(s["forward_seconds"], s["backward_seconds"] + recompute[s["stage"]])
        for s in program["costs"]["stages"]
    }


def recompute_seconds(program: dict) -> list[float]:
    """Per stage, the seconds per micro-batch its backward spends recomputing checkpointed regions."""
    seconds = [0.0] * len(program["stages"])
    for region in program["costs"].get("recomputed", []):
        seconds[region["stage"]] += region["recompute_seconds"]
    return seconds


# What a trace's action costs are read in: its wall-clock duration, or its rank's CPU time in it.
CLOCKS = ("wall", "cpu")


def measured_stage_costs(
    trace: dict, average=statistics.median, clock: str = "wall"
) -> dict[int, StageCosts]:
    """Per stage, the median (or ``average``) seconds its F, B, I and W actions took in a measured
    run's trace (``run.py --trace``): the costs the stages really had, with every rank busy at once.
    ``clock="cpu"`` reads each action's CPU time (``args.cpu_us``) instead of its duration: the
    stage's own work, without the time slices other ranks sharing its core took meanwhile.

    Example::

        >>> from ppcompile.runtime.trace import trace_document, trace_event
        >>> doc = trace_document([trace_event(0, "0F0", "F", 0, 1), trace_event(0, "0B0", "B", 1, 3)], [0])
        >>> measured_stage_costs(doc)
        {0: StageCosts(forward=1.0, backward=2.0, backward_input=None, backward_weight=None)}
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r}: use one of {', '.join(CLOCKS)}")
    durations: dict[tuple[int, ActionKind], list[float]] = {}
    for event in trace["traceEvents"]:
        if event.get("ph") != "X":
            continue
        action = Action.parse(event["name"])
        # An action on spare cores is not what the stage costs beside busy ranks; a replay of the
        # program divides the stage's cost by the plan's speedup for it instead.
        if action.is_compute and not event.get("args", {}).get("threads"):
            # A trace leaves out a CPU time of 0 (an action quicker than the clock's tick).
            seconds = event["dur"] if clock == "wall" else event.get("args", {}).get("cpu_us", 0.0)
            durations.setdefault((action.stage, action.kind), []).append(seconds / 1e6)
    averaged = {key: average(found) for key, found in durations.items()}
    costs = {}
    for stage in sorted({stage for stage, _ in durations}):
        backward_input = averaged.get((stage, ActionKind.I))
        backward_weight = averaged.get((stage, ActionKind.W))
        whole = averaged.get((stage, ActionKind.B), (backward_input or 0.0) + (backward_weight or 0.0))
        costs[stage] = StageCosts(
            averaged.get((stage, ActionKind.F), 0.0), whole, backward_input, backward_weight
        )
    return costs


def run_stage_costs(trace: dict, clock: str = "wall") -> dict[int, StageCosts]:
    """Per stage, its F, B, I and W in a run's trace: what a replay of that run's costs uses
    (``simulate --costs-from``, the benchmarks' bounds, calibration under torchrun).

    Within a step the mean of the stage's actions (a step pays for every slow action), then the
    median of those over the traced steps, as a run's step time is the median of its steps: a
    step the machine took time from moves neither. An action's n-th appearance is in step n.
    ``clock``: as :func:`measured_stage_costs`'s."""
    per_step = [
        measured_stage_costs({"traceEvents": events}, average=statistics.fmean, clock=clock)
        for events in _traced_steps(trace)
    ]

    def median(values: list[float | None]) -> float | None:
        return None if None in values else statistics.median(values)

    costs = {}
    for stage in sorted({stage for costs_of_step in per_step for stage in costs_of_step}):
        timed = [c[stage] for c in per_step if stage in c]
        costs[stage] = StageCosts(
            *(median([getattr(c, field.name) for c in timed]) for field in dataclasses.fields(StageCosts))
        )
    return costs


def send_calls_by_stage(trace: dict) -> dict[tuple[int, str], list[float]]:
    """Every send call's seconds in a run's trace, by (stage, ``SEND_F`` or ``SEND_B``).

    Example::

        >>> from ppcompile.runtime.trace import trace_document, trace_event
        >>> send_calls_by_stage(trace_document([trace_event(1, "1SEND_B0", "SEND_B", 0, 0.003)], [1]))
        {(1, 'SEND_B'): [0.003]}
    """
    calls: dict[tuple[int, str], list[float]] = {}
    for event in trace["traceEvents"]:
        if event.get("ph") == "X" and event.get("cat") in ("SEND_F", "SEND_B"):
            calls.setdefault((Action.parse(event["name"]).stage, event["cat"]), []).append(event["dur"] / 1e6)
    return calls


def send_call_seconds(trace: dict) -> float | None:
    """The seconds a rank spent in one send call (SEND_F or SEND_B) in a run's trace: within a
    step the mean over every rank's calls, over the steps the median, as :func:`run_stage_costs`
    times compute. None where nothing was sent (one stage).

    Example::

        >>> from ppcompile.runtime.trace import trace_document, trace_event
        >>> events = [trace_event(0, "0SEND_F0", "SEND_F", 0, 0.001), trace_event(1, "1SEND_B0", "SEND_B", 0, 0.003)]
        >>> send_call_seconds(trace_document(events, [0, 1]))
        0.002
    """
    per_step = []
    for events in _traced_steps(trace):
        calls = [e["dur"] / 1e6 for e in events if e.get("cat") in ("SEND_F", "SEND_B")]
        if calls:
            per_step.append(statistics.fmean(calls))
    return statistics.median(per_step) if per_step else None


def _traced_steps(trace: dict) -> list[list[dict]]:
    """A trace's action events per step: an action's n-th appearance is in step n."""
    steps: list[list[dict]] = []
    seen: dict[str, int] = {}
    for event in sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"), key=lambda e: e["ts"]):
        step = seen[event["name"]] = seen.get(event["name"], -1) + 1
        if step == len(steps):
            steps.append([])
        steps[step].append(event)
    return steps


# Points of the jitter distribution program.json keeps, and replays a jittered prediction takes
# the median of.
JITTER_QUANTILES = 21
JITTER_DRAWS = 32


def action_jitter(trace: dict) -> list[float] | None:
    """How a run's compute actions scatter around their cost: every F, B, I and W's duration over
    the mean of its stage's actions of that kind in the same step, as JITTER_QUANTILES evenly
    spaced quantiles (the first the fastest). None where no stage ran two actions of a kind.

    On a machine whose ranks share cores, one rank's action now and then takes twice its time.
    Where the ranks wait on each other every micro-batch (1F1B), each wait lasts as long as the
    slower of the two, so a step is longer than the replay of mean costs: a simulation that draws
    durations from this distribution predicts that (:func:`simulate_program`).

    Example::

        >>> from ppcompile.runtime.trace import trace_document, trace_event
        >>> events = [trace_event(0, f"0F{m}", "F", m, m + d) for m, d in enumerate([1.0, 1.0, 1.0, 3.0])]
        >>> action_jitter(trace_document(events, [0]))[::10]
        [0.6666666666666666, 0.6666666666666666, 2.0]
    """
    factors = []
    for events in _traced_steps(trace):
        durations: dict[tuple[int, int, ActionKind], list[float]] = {}
        for event in events:
            action = Action.parse(event["name"])
            if action.is_compute and not event.get("args", {}).get("threads"):
                durations.setdefault((event["pid"], action.stage, action.kind), []).append(event["dur"])
        for found in durations.values():
            mean = statistics.fmean(found)
            if len(found) > 1 and mean > 0:
                factors.extend(d / mean for d in found)
    if not factors:
        return None
    ordered = sorted(factors)
    return [_quantile(ordered, q / (JITTER_QUANTILES - 1)) for q in range(JITTER_QUANTILES)]


def _quantile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (q=0 the first, q=1 the last)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def simulate_program(
    program: dict,
    key: str = "schedule",
    costs: dict[int, StageCosts] | None = None,
    start_seconds: Sequence[float] | None = None,
    jitter: Sequence[float] | None = None,
) -> SimResult:
    """One step of the program's schedule with its predicted stage costs (or ``costs``, such as
    :func:`measured_stage_costs`) and its link's transfer times.

    A training step predicted from a ``--profile``d program's own costs ends with the update:
    tied gradients all-reduced between their ranks, then each rank's optimizer step, so its
    ``step_time`` is what ``run.py`` prints per step; where the stages were timed under torchrun,
    each rank also begins its step as late as it did there (``start_seconds`` of the calibration's
    trace), and the compute actions scatter as they did there: the step is the median of
    JITTER_DRAWS replays whose every action's cost is scaled by a draw from ``jitter`` (the
    calibration's :func:`action_jitter`). Bubbles stay those of the pipeline (the part a trace
    records). A replay of given ``costs`` is the pipeline alone, each rank starting at its
    ``start_seconds`` (such as a measured trace's) or at 0, jittered only by a given ``jitter``."""
    schedule = program_schedule(program, key)
    calibrated = program["costs"].get("calibrated") if costs is None and key == "schedule" else None
    if calibrated is not None:
        start_seconds = calibrated.get("start_seconds") if start_seconds is None else start_seconds
        jitter = calibrated.get("jitter") if jitter is None else jitter
    costs = predicted_stage_costs(program) if costs is None else costs
    latency, bandwidth = link_of(program)
    link = program["costs"].get("link", {})
    messages = _EdgeMessages.of(program)
    idle_latency = link.get("idle_latency_seconds")

    def replay(duration_factor=None) -> SimResult:
        return simulate(
            schedule,
            costs,
            set(messages.forward),
            set(messages.backward) if key == "schedule" else set(),
            transfer_time=messages.transfer_time(latency, bandwidth),
            send_cost=link.get("send_seconds", 0.0),
            idle_transfer_time=None
            if idle_latency is None
            else messages.transfer_time(idle_latency, bandwidth),
            speedups=spare_core_speedups(program) if key == "schedule" else None,
            start_times=dict(enumerate(start_seconds)) if start_seconds else None,
            duration_factor=duration_factor,
        )

    def whole_step(result: SimResult) -> float:
        return result.step_time if calibrated is None else _step_with_update(program, result, calibrated)

    result = replay()
    if not jitter:
        return dataclasses.replace(result, step_time=whole_step(result))
    draws = [replay(_jitter_draw(jitter, seed)) for seed in range(JITTER_DRAWS)]
    pipeline = statistics.median(d.step_time for d in draws)
    busy = result.busy_time
    return dataclasses.replace(
        result,
        step_time=statistics.median(whole_step(d) for d in draws),
        bubble_fraction=tuple((pipeline - b) / pipeline for b in busy),
        overall_bubble_fraction=1 - sum(busy) / (len(busy) * pipeline),
    )


def _jitter_draw(jitter: Sequence[float], seed: int):
    """A duration factor per compute action, drawn from the quantiles ``jitter`` (reproducibly)."""
    rng = random.Random(seed)
    return lambda action: _quantile(jitter, rng.random())


@dataclasses.dataclass(frozen=True)
class _EdgeMessages:
    """Per edge (producer, consumer) and direction: the bytes of its one message per micro-batch
    (the runtime packs every tensor an edge carries one way into one message)."""

    forward: dict[tuple[int, int], int]
    backward: dict[tuple[int, int], int]

    @classmethod
    def of(cls, program: dict) -> _EdgeMessages:
        forward, backward = {}, {}
        for b in program["boundaries"]:
            nbytes = boundary_bytes(program, b)
            for table in (forward, backward) if b["requires_grad"] else (forward,):
                for c in b["consumers"]:
                    table[(b["producer"], c)] = table.get((b["producer"], c), 0) + nbytes
        return cls(forward, backward)

    def transfer_time(self, latency: float, bandwidth: float):
        """The simulator's TransferTime: the message's latency plus its bytes over the bandwidth."""

        def seconds(producer: int, consumer: int, direction: ActionKind) -> float:
            table = self.forward if direction == ActionKind.SEND_F else self.backward
            return latency + table[(producer, consumer)] / bandwidth

        return seconds


def spare_core_speedups(program: dict) -> dict[Action, float]:
    """The training actions program.json's ``"spare_cores"`` runs on every core, with their speedup."""
    plan = program.get("spare_cores")
    if not plan:
        return {}
    return {
        action: plan["speedup"]
        for actions in plan["ranks"].values()
        for action in parse_rank_actions(actions)
    }


def link_of(program: dict) -> tuple[float, float]:
    """(latency seconds, bandwidth bytes/s) of one message between the program's ranks."""
    link = program["costs"].get("link")
    if link is not None:
        return link["latency_seconds"], link["bandwidth_bytes_per_second"]
    profile = get_profile(program["config"]["device_profile"])  # programs from before the link was recorded
    return profile.link_latency, profile.link_bandwidth


def _step_with_update(program: dict, result: SimResult, calibrated: dict) -> float:
    ranks = len(calibrated["update_seconds"])
    done = [0.0] * ranks
    for event in result.events:
        done[event.rank] = max(done[event.rank], event.end)
    latency, bandwidth = link_of(program)
    groups = [
        (members, nbytes)
        for group, nbytes in zip(program["tied_parameters"], calibrated["tied_bytes"])
        if len(members := sorted({stage % ranks for stage in group["stages"]})) > 1
    ]
    measured = calibrated.get("reduce_seconds")
    if measured is not None and groups:
        # Timed under torchrun: every tied all-reduce of the step, as long as the rank that
        # reached them last spent in them.
        members = sorted({r for group_members, _ in groups for r in group_members})
        groups = [(members, None)]
    for members, nbytes in groups:
        synced = max(done[r] for r in members) + (
            measured if nbytes is None else latency + nbytes / bandwidth
        )
        for r in members:
            done[r] = synced
    return max(d + u for d, u in zip(done, calibrated["update_seconds"]))
