"""Spare cores: the actions a rank runs while the others wait get every core; found by the
simulator, priced by it, applied by the runtime, and still training like eager."""

import json
import subprocess
from fractions import Fraction

import pytest

from ppcompile import spare_cores
from ppcompile.replay import measured_stage_costs, simulate_program
from ppcompile.runtime.actions import Action, format_rank_actions
from ppcompile.runtime.executor import available_cores
from ppcompile.runtime.trace import trace_document, trace_event
from ppcompile.schedules import lower_communication, make_schedule
from ppcompile.simulate import StageCosts, simulate
from ppcompile.spare_cores import ALONE_OVERLAP, alone_actions, plan_spare_cores, spare_cores_note
from tests.helpers import compare_record, compile_to, torchrun_command


def chain(K):
    return {(s, s + 1) for s in range(K - 1)}


@pytest.mark.parametrize(
    "name,K,M,expected",
    [
        ("1f1b", 2, 8, {0: "0F0 0B7", 1: "1B0"}),
        ("1f1b", 4, 8, {0: "0F0 0B7", 3: "3B0"}),
        ("gpipe", 2, 4, {0: "0F0 0B3", 1: "1F3 1B0"}),
    ],
)
def test_alone_actions_are_the_bubbles_of_the_schedule(name, K, M, expected):
    lowered = lower_communication(make_schedule(name, K, M), chain(K))
    result = simulate(lowered, [StageCosts(1, 2)] * K, chain(K))
    alone = alone_actions(result)
    assert {rank: format_rank_actions(actions) for rank, actions in alone.items()} == expected
    # Every other compute action overlaps another rank's compute for more than the margin.
    listed = {a for actions in alone.values() for a in actions}
    compute = [e for e in result.events if e.action.is_compute]
    for e in compute:
        overlap = sum(max(0, min(e.end, o.end) - max(e.start, o.start)) for o in compute if o.rank != e.rank)
        assert (e.action in listed) == (overlap <= ALONE_OVERLAP * (e.end - e.start))


def test_the_simulator_prices_actions_on_spare_cores_exactly():
    lowered = lower_communication(make_schedule("1f1b", 2, 2), chain(2))
    costs = [StageCosts(Fraction(1), Fraction(2))] * 2
    plain = simulate(lowered, costs, chain(2))
    # 0F0 starts the step and everything waits on it: half its time comes off the step.
    faster = simulate(lowered, costs, chain(2), speedups={Action.parse("0F0"): 2})
    assert faster.step_time == plain.step_time - Fraction(1, 2)
    assert faster.busy_time[0] == plain.busy_time[0] - Fraction(1, 2)


@pytest.fixture
def any_length(monkeypatch):
    """gpt_mini's actions are far below MIN_ACTION_SECONDS: plan them anyway, for the mechanics."""
    monkeypatch.setattr(spare_cores, "MIN_ACTION_SECONDS", 0.0)


def test_short_actions_get_no_spare_cores(tmp_path):
    program = json.loads((compile_to(tmp_path, "models/gpt.py:gpt_mini", 2) / "program.json").read_text())
    result = simulate_program(program)
    longest = max(e.end - e.start for e in result.events if e.action.is_compute)
    assert alone_actions(result) and longest < spare_cores.MIN_ACTION_SECONDS
    plan_spare_cores(program, result, cores=2, speedup=1.5)
    assert "spare_cores" not in program


def test_a_plan_goes_into_program_json_and_its_simulation(tmp_path, any_length):
    program_dir = compile_to(tmp_path, "models/gpt.py:gpt_mini", 2, microbatches=8)
    program = json.loads((program_dir / "program.json").read_text())
    before = simulate_program(program)
    plan_spare_cores(program, before, cores=2, speedup=1.5)
    assert program["spare_cores"]["threads"] == 2 and program["spare_cores"]["speedup"] == 1.5
    assert program["spare_cores"]["ranks"]["0"].split()[0] == "0F0"
    assert simulate_program(program).step_time < before.step_time
    assert "run on all 2 cores (measured 1.50x faster alone): rank 0: 0F0" in spare_cores_note(program)
    # One rank: nobody waits, nothing to plan.
    single = json.loads((compile_to(tmp_path / "one", "models/mlp.py:mlp", 1) / "program.json").read_text())
    plan_spare_cores(single, simulate_program(single), cores=2, speedup=1.5)
    assert "spare_cores" not in single


def test_stage_costs_from_a_trace_leave_out_actions_on_spare_cores():
    doc = trace_document(
        [
            trace_event(0, "0F0", "F", 0, 0.5, threads=2),  # alone, on both cores
            trace_event(0, "0F1", "F", 0.5, 1.5),
            trace_event(0, "0B0", "B", 1.5, 3.5),
        ],
        [0],
    )
    assert measured_stage_costs(doc)[0] == StageCosts(1.0, 2.0)


def test_compile_without_profile_plans_nothing(tmp_path):
    program = json.loads((compile_to(tmp_path, "models/gpt.py:gpt_mini", 2) / "program.json").read_text())
    assert "spare_cores" not in program


@pytest.mark.skipif(available_cores() < 2, reason="needs two cores to hand one out")
def test_torchrun_runs_the_plan_and_trains_like_eager(tmp_path, any_length):
    program_dir = compile_to(tmp_path, "models/gpt.py:gpt_mini", 2, microbatches=4)
    path = program_dir / "program.json"
    program = json.loads(path.read_text())
    plan_spare_cores(program, simulate_program(program), cores=2, speedup=1.5)
    path.write_text(json.dumps(program, indent=1))
    planned = {a for actions in program["spare_cores"]["ranks"].values() for a in actions.split()}
    record, trace = tmp_path / "record", tmp_path / "trace.json"
    command = torchrun_command(
        program_dir,
        2,
        "--steps",
        "3",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--record",
        str(record),
        "--trace",
        str(trace),
        "--trace-steps",
        "2",
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    wide = {e["name"] for e in events if e.get("args", {}).get("threads") == 2}
    assert wide == planned
    losses, reference, comparison = compare_record(program_dir, record, 2)
    assert comparison.ok, "\n".join(comparison.lines())
    assert losses[0] == reference[0][0]  # the same operations on more threads: still bitwise
