"""Pictures of a simulated step: a Chrome trace (for Perfetto) and a PNG (for a report or an issue).

Both show one row per rank. The trace uses the layout of ``ppcompile.runtime.trace``, the same one
the runtime writes for measured steps, so a prediction and a measurement open side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ppcompile.runtime.actions import ActionKind
from ppcompile.runtime.trace import trace_document, trace_event
from ppcompile.schedules import ScheduleError
from ppcompile.simulate import SimResult, TimelineEvent

# Fill colours per compute kind, from the colour-blind-safe "tab10" palette.
COMPUTE_COLOURS = {
    ActionKind.F: "#1f77b4",  # blue
    ActionKind.B: "#2ca02c",  # green
    ActionKind.I: "#ff7f0e",  # orange
    ActionKind.W: "#9467bd",  # purple
}
WAIT_COLOUR = "#7f7f7f"  # grey: blocked in a RECV, waiting for a peer's message
LEGEND_NAMES = {
    ActionKind.F: "F forward",
    ActionKind.B: "B backward",
    ActionKind.I: "I input grad",
    ActionKind.W: "W weight grad",
}


class MissingDependency(ScheduleError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def chrome_trace(
    events: Iterable[TimelineEvent], *, include_communication: bool = True, metadata: dict | None = None
) -> dict:
    """The simulated timeline as Chrome trace-event JSON: one process per rank, one complete event
    per action (a RECV's duration is the time spent waiting for it). ``json.dumps`` it to a file
    and open that in https://ui.perfetto.dev or chrome://tracing.

    Example::

        >>> from ppcompile.runtime.actions import Action
        >>> event = TimelineEvent(rank=0, action=Action(0, ActionKind.F, 3), start=0, end=0.002)
        >>> chrome_trace([event])["traceEvents"][-1]
        {'name': '0F3', 'cat': 'F', 'ph': 'X', 'pid': 0, 'tid': 0, 'ts': 0.0, 'dur': 2000.0}
    """
    events = list(events)
    shown = [e for e in events if include_communication or e.action.is_compute]
    trace_events = [trace_event(e.rank, str(e.action), e.action.kind.value, e.start, e.end) for e in shown]
    # Name every rank that appears, even one whose shown events were all filtered out.
    return trace_document(trace_events, ranks={e.rank for e in events}, metadata=metadata)


def render_png(result: SimResult, path: str | Path, title: str = "") -> Path:
    """Draw ``result``'s timeline to a PNG: one row per rank (rank 0 on top), F/B/I/W as coloured
    bars labelled with their microbatch, time blocked in a RECV as a thin grey strip under the row,
    and idle time as white gaps; the x axis is in milliseconds. Needs matplotlib (optional).

    Example::

        >>> render_png(result, "timeline.png", title="gpt, 1f1b, K=4, M=8")  # doctest: +SKIP
    """
    figure_class = _matplotlib_figure()
    num_ranks = len(result.busy_time)
    figure = figure_class(figsize=(12, 1.2 + 0.6 * num_ranks), dpi=120)
    axes = figure.subplots()
    # Below this width (a fraction of the step) a label would not fit inside its bar.
    min_label_width = float(result.step_time) / 90 if result.step_time else 0
    # With V virtual stages, later chunks of a rank are drawn paler so that chunks tell apart.
    last_chunk = max((e.action.stage // num_ranks for e in result.events), default=0)
    drawn_kinds = set()
    for event in result.events:
        start_ms, width_ms = float(event.start) * 1e3, float(event.end - event.start) * 1e3
        kind = event.action.kind
        if event.action.is_compute:
            drawn_kinds.add(kind)
            chunk = event.action.stage // num_ranks
            axes.barh(
                event.rank,
                width_ms,
                left=start_ms,
                height=0.6,
                color=COMPUTE_COLOURS[kind],
                alpha=1 - 0.45 * chunk / max(last_chunk, 1),
                edgecolor="white",
                linewidth=0.5,
            )
            if float(event.end - event.start) >= min_label_width:
                axes.text(
                    start_ms + width_ms / 2,
                    event.rank,
                    str(event.action.microbatch),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
        elif kind in (ActionKind.RECV_F, ActionKind.RECV_B) and width_ms > 0:
            drawn_kinds.add("wait")
            axes.barh(event.rank + 0.38, width_ms, left=start_ms, height=0.12, color=WAIT_COLOUR)
    _label_axes(axes, result, num_ranks, title)
    _legend(axes, drawn_kinds, chunked=last_chunk > 0)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def _matplotlib_figure():
    # matplotlib is optional: only PNG output needs it. The Figure API draws without pyplot's global
    # state, so rendering neither opens windows nor changes the caller's backend.
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency("--png needs matplotlib: pip install matplotlib") from None
    return Figure


def _label_axes(axes, result: SimResult, num_ranks: int, title: str) -> None:
    axes.set_yticks(range(num_ranks), [f"rank {rank}" for rank in range(num_ranks)])
    axes.set_ylim(num_ranks - 0.4, -0.6)  # rank 0 on top, room for the wait strip below the last row
    axes.set_xlim(0, float(result.step_time) * 1e3 or 1)
    axes.set_xlabel("time (ms)")
    summary = (
        f"step {float(result.step_time) * 1e3:.3g} ms, "
        f"bubble {float(result.overall_bubble_fraction) * 100:.1f}%, "
        f"peak live microbatches per rank {list(result.peak_live_per_rank)}"
    )
    axes.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)
    axes.grid(axis="x", color="#dddddd", linewidth=0.5)
    axes.set_axisbelow(True)


def _legend(axes, drawn_kinds: set, chunked: bool) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(color=COMPUTE_COLOURS[kind], label=LEGEND_NAMES[kind])
        for kind in COMPUTE_COLOURS
        if kind in drawn_kinds
    ]
    if "wait" in drawn_kinds:
        handles.append(Patch(color=WAIT_COLOUR, label="waiting in RECV"))
    handles.append(Patch(facecolor="white", edgecolor="#999999", label="idle (bubble)"))
    if chunked:
        handles.append(Patch(color=COMPUTE_COLOURS[ActionKind.F], alpha=0.55, label="paler: later chunk"))
    axes.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
