"""Timelines in Chrome's trace-event JSON, which Perfetto (ui.perfetto.dev) and chrome://tracing open.

The compiler writes predicted timelines and the runtime writes measured ones in this one layout, so
both open side by side: one process per rank (``pid`` = rank, named ``rank r``), one complete event
(``"ph": "X"``) per action, named by its text form (``1F3``) with its kind (``F``, ``SEND_F``, ...)
as the category. Times go in as seconds and are written in microseconds, as the format wants.
A measured action also states in ``args.cpu_us`` the CPU time its rank's thread spent in it: on a
CPU shared by more ranks than cores, wall time minus that is time the other ranks' work took.
Standard library only: the runtime imports this.

A measured trace (``run.py --trace``, :func:`measured_trace`) also carries the step time and every
rank's busy time in ``otherData``, so that a benchmark gets the measured bubble without re-reading
the events::

    step, busy = read_trace_times("trace.json")
    bubble = 1 - sum(busy) / (len(busy) * step)
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

MICROSECONDS_PER_SECOND = 1_000_000
# The categories (action kinds) that are a stage's compute; the rest is communication and waiting.
COMPUTE_CATEGORIES = frozenset({"F", "B", "I", "W"})
# What a training step does after its pipeline: the tied gradients' all-reduce and the update.
STEP_END_CATEGORIES = frozenset({"REDUCE_GRAD", "OPT"})


class ActionTiming(NamedTuple):
    """When one action of one rank ran, in seconds on that rank's clock (what the executor records)."""

    name: str  # the action's text form, "1F3"
    kind: str  # its kind, "F", "RECV_B", ...
    start: float
    end: float
    threads: int = 0  # CPU threads it ran on where that was more than the rank's own (spare cores)
    cpu: float = 0.0  # seconds of CPU time the rank's thread spent in it (0: not measured)


def shift_timings(timings: Iterable[ActionTiming], origin: float) -> list[ActionTiming]:
    """``timings`` relative to ``origin`` (such as the end of the barrier that began the step).

    Example::

        >>> shift_timings([ActionTiming("0F0", "F", 10.5, 10.75)], origin=10.0)
        [ActionTiming(name='0F0', kind='F', start=0.5, end=0.75, threads=0, cpu=0.0)]
    """
    return [t._replace(start=t.start - origin, end=t.end - origin) for t in timings]


def _microseconds(seconds: float) -> float:
    # Rounded to the nanosecond so that exact (Fraction) predictions print as short decimals.
    return round(float(seconds) * MICROSECONDS_PER_SECOND, 3)


def trace_event(
    rank: int,
    name: str,
    kind: str,
    start_seconds: float,
    end_seconds: float,
    threads: int = 0,
    cpu_seconds: float = 0.0,
) -> dict:
    """One action as a complete event on ``rank``'s row; ``threads`` (when not 0) goes into its
    ``args``: the action ran on spare cores; so does ``cpu_seconds`` (when not 0), as ``cpu_us``:
    the CPU time of the rank's thread in it.

    Example::

        >>> trace_event(1, "1F3", "F", 0.5, 0.75)
        {'name': '1F3', 'cat': 'F', 'ph': 'X', 'pid': 1, 'tid': 0, 'ts': 500000.0, 'dur': 250000.0}
    """
    if end_seconds < start_seconds:
        raise ValueError(
            f"trace event {name} on rank {rank} ends at {end_seconds} before it starts at {start_seconds}"
        )
    start = _microseconds(start_seconds)
    event = {
        "name": name,
        "cat": kind,
        "ph": "X",
        "pid": rank,
        "tid": 0,
        "ts": start,
        "dur": round(_microseconds(end_seconds) - start, 3),
    }
    args = {}
    if threads:
        args["threads"] = threads
    if cpu_seconds:
        args["cpu_us"] = _microseconds(cpu_seconds)
    if args:
        event["args"] = args
    return event


def rank_metadata(rank: int) -> list[dict]:
    """The metadata events that name ``rank``'s process ``rank r`` and sort the rows by rank.

    Example::

        >>> rank_metadata(2)[0]
        {'name': 'process_name', 'ph': 'M', 'pid': 2, 'tid': 0, 'args': {'name': 'rank 2'}}
    """
    return [
        {"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}},
        {"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}},
    ]


def trace_document(events: Iterable[dict], ranks: Iterable[int], metadata: dict | None = None) -> dict:
    """The whole JSON document: every rank's naming metadata, then ``events``; ``metadata`` (such
    as the schedule's name) lands in ``otherData``, which the viewers show as trace info.

    Example::

        >>> doc = trace_document([trace_event(0, "0F0", "F", 0, 1)], ranks=[0], metadata={"schedule": "1f1b"})
        >>> sorted(doc), len(doc["traceEvents"])
        (['displayTimeUnit', 'otherData', 'traceEvents'], 3)
    """
    trace_events = [meta for rank in sorted(set(ranks)) for meta in rank_metadata(rank)]
    trace_events += list(events)
    return {"traceEvents": trace_events, "displayTimeUnit": "ms", "otherData": dict(metadata or {})}


def write_trace(path: str | Path, document: dict) -> Path:
    """Write ``document`` as JSON to ``path`` and return the path."""
    path = Path(path)
    path.write_text(json.dumps(document, indent=None, separators=(",", ":")) + "\n")
    return path


def measured_trace(steps: Sequence[Sequence[Sequence[ActionTiming]]], metadata: dict | None = None) -> dict:
    """The trace document of measured steps: ``steps[j][rank]`` is that rank's timings in step ``j``,
    relative to the step's start (a barrier every rank leaves at the same moment). Steps are laid out
    one after another, each as long as its slowest rank, the update included.

    ``otherData`` gets, besides ``metadata``: ``measured_step_seconds`` (the mean step time: from the
    step's start to the end of the last pipeline action on any rank, the update left out),
    ``busy_seconds`` (per rank, the mean time per step in compute actions F/B/I/W), ``step_seconds``
    (each traced step's time), ``measured_bubble`` (``1 - sum(busy) / (K * step)``) and ``ranks`` (K).
    It also gets what a step costs around its pipeline, each the median over the steps:
    ``start_seconds`` (per rank, from the step's start to its first action: the receives posted),
    ``reduce_seconds`` (the tied gradients' all-reduce on the rank that reached it last, None
    without one) and ``update_seconds`` (per rank, its optimizer step; None when not training).

    Example::

        >>> doc = measured_trace([[[ActionTiming("0F0", "F", 0.0, 1.0)], [ActionTiming("1F0", "F", 1.0, 2.0)]]])
        >>> doc["otherData"]["measured_step_seconds"], doc["otherData"]["measured_bubble"]
        (2.0, 0.5)
    """
    if not steps:
        raise ValueError("a measured trace needs at least one step")
    ranks = len(steps[0])
    events, step_seconds, busy = [], [], [0.0] * ranks
    starts: list[list[float]] = [[] for _ in range(ranks)]
    reduces: list[float] = []
    updates: list[list[float]] = [[] for _ in range(ranks)]
    offset = 0.0
    for step in steps:
        if len(step) != ranks:
            raise ValueError(f"every traced step needs all {ranks} ranks, one has {len(step)}")
        pipeline = [[t for t in timings if t.kind not in STEP_END_CATEGORIES] for timings in step]
        step_seconds.append(max((t.end for timings in pipeline for t in timings), default=0.0))
        reduced = []
        for rank, timings in enumerate(step):
            for t in timings:
                events.append(
                    trace_event(rank, t.name, t.kind, offset + t.start, offset + t.end, t.threads, t.cpu)
                )
                if t.kind in COMPUTE_CATEGORIES:
                    busy[rank] += t.end - t.start
                elif t.kind == "REDUCE_GRAD":
                    reduced.append(t.end - t.start)
                elif t.kind == "OPT":
                    updates[rank].append(t.end - t.start)
            if pipeline[rank]:
                starts[rank].append(min(t.start for t in pipeline[rank]))
        if reduced:
            reduces.append(min(reduced))
        offset += max((t.end for timings in step for t in timings), default=0.0)
    step_time = sum(step_seconds) / len(steps)
    busy = [b / len(steps) for b in busy]
    measured = {
        "measured_step_seconds": step_time,
        "busy_seconds": busy,
        "step_seconds": step_seconds,
        "measured_bubble": 1 - sum(busy) / (ranks * step_time) if step_time > 0 else 0.0,
        "ranks": ranks,
        "start_seconds": [statistics.median(s) if s else 0.0 for s in starts],
        "reduce_seconds": statistics.median(reduces) if reduces else None,
        "update_seconds": [statistics.median(u) for u in updates] if all(updates) else None,
    }
    return trace_document(events, ranks=range(ranks), metadata={**(metadata or {}), **measured})


def read_trace_times(path: str | Path) -> tuple[float, list[float]]:
    """(step time, busy time per rank), in seconds, of the trace at ``path``.

    A measured trace states both in ``otherData``. For any other trace in this layout (a predicted
    one), they are computed from its events: the step from the first event's start to the last one's
    end, a rank's busy time as the sum of its compute events (F/B/I/W).
    """
    document = json.loads(Path(path).read_text())
    other = document.get("otherData", {})
    if "measured_step_seconds" in other and "busy_seconds" in other:
        return float(other["measured_step_seconds"]), [float(b) for b in other["busy_seconds"]]
    actions = [e for e in document.get("traceEvents", []) if e.get("ph") == "X"]
    if not actions:
        raise ValueError(f"{path} holds no action events")
    first = min(e["ts"] for e in actions)
    last = max(e["ts"] + e["dur"] for e in actions)
    ranks = 1 + max(e["pid"] for e in document["traceEvents"])
    busy = [0.0] * ranks
    for e in actions:
        if e.get("cat") in COMPUTE_CATEGORIES:
            busy[e["pid"]] += e["dur"] / MICROSECONDS_PER_SECOND
    return (last - first) / MICROSECONDS_PER_SECOND, busy
