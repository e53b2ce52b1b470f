"""Timelines in Chrome's trace-event JSON, which Perfetto (ui.perfetto.dev) and chrome://tracing open.

The compiler writes predicted timelines and the runtime writes measured ones in this one layout, so
both open side by side: one process per rank (``pid`` = rank, named ``rank r``), one complete event
(``"ph": "X"``) per action, named by its text form (``1F3``) with its kind (``F``, ``SEND_F``, ...)
as the category. Times go in as seconds and are written in microseconds, as the format wants.
Standard library only: the runtime imports this.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

MICROSECONDS_PER_SECOND = 1_000_000


def _microseconds(seconds: float) -> float:
    # Rounded to the nanosecond so that exact (Fraction) predictions print as short decimals.
    return round(float(seconds) * MICROSECONDS_PER_SECOND, 3)


def trace_event(rank: int, name: str, kind: str, start_seconds: float, end_seconds: float) -> dict:
    """One action as a complete event on ``rank``'s row.

    Example::

        >>> trace_event(1, "1F3", "F", 0.5, 0.75)
        {'name': '1F3', 'cat': 'F', 'ph': 'X', 'pid': 1, 'tid': 0, 'ts': 500000.0, 'dur': 250000.0}
    """
    if end_seconds < start_seconds:
        raise ValueError(
            f"trace event {name} on rank {rank} ends at {end_seconds} before it starts at {start_seconds}"
        )
    start = _microseconds(start_seconds)
    return {
        "name": name,
        "cat": kind,
        "ph": "X",
        "pid": rank,
        "tid": 0,
        "ts": start,
        "dur": round(_microseconds(end_seconds) - start, 3),
    }


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
