"""Spare cores: the actions a rank runs while every other rank waits get the idle cores too.

On a CPU machine whose cores the K ranks share (torchrun gives each rank one thread), a pipeline
leaves cores idle in its bubbles: in 1F1B at K=2 the first stage computes its first forward and
its last backward alone, and the last stage its first backward. The simulator knows which
actions those are; this plan names them, and the runtime runs them on every core. That is not a
change of schedule: the same actions run in the same order, only faster where nothing else
needs the cores.

An action counts as alone when the other ranks compute during at most ``ALONE_OVERLAP`` of it
in the simulated step. Oversubscribing is costly (a parallel operator waits for its slowest
thread, which then shares a core), so the margin errs toward leaving cores idle. Handing out
cores has a price of its own: after a parallel region OpenMP's workers spin before they sleep,
on the cores the other ranks need next, and a tiny operator gains nothing from a second thread.
On gpt_mini (1-2 ms actions) a plan of three actions took the step from 33 to 55-69 ms; only
actions of at least ``MIN_ACTION_SECONDS`` are planned. It is off by default (``--spare-cores``
turns it on): on the 4-layer benchmark GPT the actions it names ran 1.6-1.8x faster, but the
step's gain stayed within the noise of the shared machine.

The plan in program.json, read by the runtime and by the simulator::

    "spare_cores": {"threads": 2, "speedup": 1.7, "ranks": {"0": "0F0 0B7"}}
"""

from __future__ import annotations

import bisect

from ppcompile.runtime.actions import format_rank_actions
from ppcompile.simulate import SimResult, TimelineEvent

ALONE_OVERLAP = 0.05
MIN_ACTION_SECONDS = 0.02


def alone_actions(result: SimResult) -> dict[int, list]:
    """Per rank, its compute actions during which the other ranks compute at most ALONE_OVERLAP of
    the time, in the rank's order.

    Example (1F1B, K=2, M=2, F=1 and B=2 everywhere)::

        >>> from ppcompile.schedules import lower_communication, make_schedule
        >>> from ppcompile.simulate import StageCosts, simulate
        >>> lowered = lower_communication(make_schedule("1f1b", 2, 2), {(0, 1)})
        >>> alone = alone_actions(simulate(lowered, [StageCosts(1, 2)] * 2, {(0, 1)}))
        >>> {rank: format_rank_actions(actions) for rank, actions in alone.items()}
        {0: '0F0 0B1', 1: '1B0'}
    """
    compute: dict[int, list[TimelineEvent]] = {}
    for event in result.events:
        if event.action.is_compute and event.end > event.start:
            compute.setdefault(event.rank, []).append(event)
    starts = {rank: [e.start for e in events] for rank, events in compute.items()}
    alone: dict[int, list] = {}
    for rank, events in compute.items():
        for event in events:
            overlap = 0.0
            for other, others in compute.items():
                if other == rank:
                    continue
                # A rank's own actions never overlap: from the last one starting before this ends, back.
                i = bisect.bisect_left(starts[other], event.end) - 1
                while i >= 0 and others[i].end > event.start:
                    overlap += min(event.end, others[i].end) - max(event.start, others[i].start)
                    i -= 1
            if overlap <= ALONE_OVERLAP * (event.end - event.start):
                alone.setdefault(rank, []).append(event.action)
    return alone


def plannable_actions(result: SimResult) -> dict[int, list]:
    """:func:`alone_actions` that last at least MIN_ACTION_SECONDS, per rank (ranks with none left out)."""
    durations = {(e.rank, e.action): e.end - e.start for e in result.events}
    plannable = {}
    for rank, actions in alone_actions(result).items():
        long = [a for a in actions if durations[(rank, a)] >= MIN_ACTION_SECONDS]
        if long:
            plannable[rank] = long
    return plannable


def plan_spare_cores(program: dict, result: SimResult, cores: int, speedup: float) -> None:
    """Write program.json's ``"spare_cores"``: the actions of ``result`` (the program's simulated
    step) that run alone for at least MIN_ACTION_SECONDS get ``cores`` threads, expected
    ``speedup`` times faster. A program with one rank, or with no such action, gets none."""
    program.pop("spare_cores", None)
    if len(program["schedule"]["ranks"]) < 2:
        return
    alone = plannable_actions(result)
    if not alone:
        return
    program["spare_cores"] = {
        "threads": cores,
        "speedup": round(speedup, 4),
        "ranks": {str(rank): format_rank_actions(actions) for rank, actions in sorted(alone.items())},
    }


def spare_cores_note(program: dict) -> str | None:
    """One line for the report, or None without a plan."""
    plan = program.get("spare_cores")
    if not plan:
        return None
    parts = [f"rank {rank}: {actions}" for rank, actions in plan["ranks"].items()]
    return (
        f"spare cores: the other ranks wait through these actions, so they run on all {plan['threads']} "
        f"cores (measured {plan['speedup']:.2f}x faster alone): " + "; ".join(parts)
    )
