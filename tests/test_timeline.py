"""Timeline output: Chrome trace JSON (shared with the runtime) and the optional PNG."""

import ast
import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

import ppcompile.runtime.trace as runtime_trace
from ppcompile.runtime.trace import trace_document, trace_event, write_trace
from ppcompile.schedules import ScheduleError, linear_edges, lower_communication, make_schedule
from ppcompile.simulate import StageCosts, simulate
from ppcompile.timeline import MissingDependency, chrome_trace, render_png

# Seconds, as the cost model gives them: 1 ms forward, 1 ms each for I and W.
MS = Fraction(1, 1000)
COSTS = StageCosts(forward=MS, backward=2 * MS)


def simulated(name="zb-h1", num_ranks=3, microbatches=4, virtual_stages=1):
    schedule = make_schedule(name, num_ranks, microbatches, virtual_stages)
    edges = linear_edges(schedule.num_stages)
    return simulate(lower_communication(schedule, edges), [COSTS] * schedule.num_stages, edges)


def test_trace_event_is_a_complete_event_in_microseconds():
    assert trace_event(2, "2I3", "I", Fraction(1, 1000), Fraction(3, 1000)) == {
        "name": "2I3",
        "cat": "I",
        "ph": "X",
        "pid": 2,
        "tid": 0,
        "ts": 1000.0,
        "dur": 2000.0,
    }


def test_trace_event_rejects_negative_durations():
    with pytest.raises(ValueError, match="0F0 on rank 0 ends at 1 before it starts at 2"):
        trace_event(0, "0F0", "F", 2, 1)


def test_chrome_trace_is_valid_json_with_one_named_process_per_rank():
    result = simulated()
    document = chrome_trace(result.events, metadata={"schedule": "zb-h1"})
    assert json.loads(json.dumps(document)) == document
    assert document["otherData"] == {"schedule": "zb-h1"}
    events = document["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "rank 0", 1: "rank 1", 2: "rank 2"}
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(result.events)
    for event in complete:
        assert {"name", "cat", "ph", "pid", "tid", "ts", "dur"} <= set(event)
        assert event["dur"] >= 0 and event["ts"] >= 0
    by_name = {e["name"]: e for e in complete}
    assert (
        by_name["1F3"]["cat"] == "F"
        and by_name["1W0"]["cat"] == "W"
        and by_name["0SEND_F0"]["cat"] == "SEND_F"
    )
    assert by_name["0F0"]["ts"] == 0 and by_name["0F0"]["dur"] == 1000  # 1 ms
    last_end = max(e["ts"] + e["dur"] for e in complete)
    assert last_end == pytest.approx(float(result.step_time) * 1e6)


def test_chrome_trace_can_hide_communication():
    result = simulated("interleaved-1f1b", 2, 2, 2)
    document = chrome_trace(result.events, include_communication=False)
    kinds = {e["cat"] for e in document["traceEvents"] if e["ph"] == "X"}
    assert kinds == {"F", "B"}
    assert {e["name"] for e in document["traceEvents"] if e["ph"] == "X"} >= {"2F1", "3B0"}


def test_written_trace_reads_back(tmp_path):
    document = trace_document([trace_event(0, "0F0", "F", 0, 0.5)], ranks=[0])
    path = write_trace(tmp_path / "trace.json", document)
    assert json.loads(path.read_text()) == document


def test_runtime_trace_module_imports_only_the_standard_library():
    # The runtime may not import the compiler, nor anything but torch and the standard library.
    tree = ast.parse(Path(runtime_trace.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_render_png_without_matplotlib_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependency) as error:
        render_png(simulated(), tmp_path / "t.png")
    assert str(error.value) == "--png needs matplotlib: pip install matplotlib"
    assert isinstance(error.value, ScheduleError)  # callers that catch ScheduleError report it too
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("name,virtual_stages", [("zb-h1", 1), ("interleaved-1f1b", 2), ("forward-only", 1)])
def test_render_png_writes_a_png(tmp_path, name, virtual_stages):
    pytest.importorskip("matplotlib")
    path = render_png(simulated(name, 3, 6, virtual_stages), tmp_path / "t.png", title=name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
