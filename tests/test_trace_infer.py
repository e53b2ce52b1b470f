"""Measured traces (``--trace``) and forward-only evaluation (``--infer``): in process, then on torchrun."""

import dataclasses
import json
import statistics
import subprocess
import sys
from collections import Counter

import pytest
import torch

from ppcompile.replay import action_jitter, run_stage_costs, simulate_program
from ppcompile.runtime.actions import Action, ActionKind, parse_rank_actions
from ppcompile.runtime.executor import forward_only_schedule
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.spec import call_forward, loss_of
from ppcompile.runtime.trace import (
    COMPUTE_CATEGORIES,
    ActionTiming,
    measured_trace,
    read_trace_times,
    trace_document,
    trace_event,
    write_trace,
)
from ppcompile.runtime.train import InProcessPipeline, batches
from tests.helpers import build_model, compile_to, torchrun_command


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    return compile_to(
        tmp_path_factory.mktemp("mini"), "models/gpt.py:gpt_mini", 2, microbatches=4, schedule="1f1b"
    )


def torchrun(program_dir, nproc, *args):
    command = torchrun_command(program_dir, nproc, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def action_events(document: dict) -> list[dict]:
    return [e for e in document["traceEvents"] if e["ph"] == "X"]


# In process ---------------------------------------------------------------------------------------


def test_in_process_trace_has_every_action_once_without_overlap(mini_dir):
    program = load_program(mini_dir)
    pipeline = InProcessPipeline(program)
    trace = []
    pipeline.step(next(batches(program, pipeline.spec, 0)), trace=trace)
    document = measured_trace(trace, {"schedule": "1f1b"})
    events = action_events(document)

    for rank in range(2):
        row = [e for e in events if e["pid"] == rank]
        assert [e["name"] for e in row] == program.data["schedule"]["ranks"][str(rank)].split()
        for before, after in zip(row, row[1:]):
            assert before["ts"] + before["dur"] <= after["ts"]
    compute = {(e["name"], e["cat"]) for e in events if e["cat"] in COMPUTE_CATEGORIES}
    assert compute == {(f"{s}{k}{m}", k) for s in range(2) for k in "FB" for m in range(4)}
    # Each compute action also states its thread's CPU time, which cannot exceed its wall time.
    for e in events:
        if e["cat"] in COMPUTE_CATEGORIES:
            assert 0 < e["args"]["cpu_us"] <= e["dur"] + 50, e

    other = document["otherData"]
    assert other["ranks"] == 2 and other["schedule"] == "1f1b"
    assert 0 < max(other["busy_seconds"]) <= other["measured_step_seconds"]
    assert 0 <= other["measured_bubble"] < 1


def test_read_trace_times_reads_measured_and_predicted_traces(tmp_path, mini_dir):
    program = load_program(mini_dir)
    pipeline = InProcessPipeline(program)
    trace = []
    pipeline.step(next(batches(program, pipeline.spec, 0)), trace=trace)
    document = measured_trace(trace)
    step, busy = read_trace_times(write_trace(tmp_path / "measured.json", document))
    assert (step, busy) == (
        document["otherData"]["measured_step_seconds"],
        document["otherData"]["busy_seconds"],
    )

    # A trace without the measured metadata (a predicted one): both come from the events.
    events = [
        trace_event(0, "0F0", "F", 0.0, 1.0),
        trace_event(0, "0SEND_F0", "SEND_F", 1.0, 1.5),
        trace_event(1, "1RECV_F0", "RECV_F", 0.0, 1.5),
        trace_event(1, "1F0", "F", 1.5, 2.0),
    ]
    predicted = write_trace(tmp_path / "predicted.json", trace_document(events, ranks=[0, 1]))
    assert read_trace_times(predicted) == (2.0, [1.0, 0.5])


def test_a_measured_trace_states_the_step_around_its_pipeline():
    """The all-reduce and the update are on the timeline but not in the pipeline's step time;
    when each rank began, the all-reduce of the last rank to reach it and each update are stated."""

    def step(first_start, reduce, update):
        ranks = []
        for rank, start in enumerate(first_start):
            end = start + 1.0
            ranks.append(
                [
                    ActionTiming(f"{rank}F0", "F", start, end),
                    ActionTiming(f"{rank}REDUCE_GRAD", "REDUCE_GRAD", end, end + reduce[rank]),
                    ActionTiming(f"{rank}OPT", "OPT", end + reduce[rank], end + reduce[rank] + update[rank]),
                ]
            )
        return ranks

    steps = [step([0.1, 0.2], [0.5, 0.25], [0.3, 0.4]), step([0.3, 0.4], [0.25, 0.75], [0.5, 0.6])]
    other = measured_trace(steps)["otherData"]
    assert other["step_seconds"] == pytest.approx([1.2, 1.4])  # the last pipeline action's end
    assert other["start_seconds"] == pytest.approx([0.2, 0.3])
    assert other["reduce_seconds"] == pytest.approx(0.25)  # median of each step's shortest wait
    assert other["update_seconds"] == pytest.approx([0.4, 0.5])
    # The second step is laid out after the first one's update, not over it.
    second = [e for e in measured_trace(steps)["traceEvents"] if e.get("name") == "0F0"][1]
    assert second["ts"] == pytest.approx((1.1 + 0.5 + 0.3 + 0.3) * 1e6)  # rank 0 ended the first


@pytest.mark.parametrize(
    "ref,stages",
    [
        ("models/gpt.py:gpt_mini", 2),
        ("models/mlp.py:mlp_deep", 3),
        ("tests/fixtures/llama_rotary.py:model", 3),  # complex frequencies cross both cuts
        ("tests/fixtures/keyword_inputs.py:model", 2),  # inputs by name, a dict returned
        ("tests/fixtures/no_grad_regions.py:linear_probe", 3),  # cuts inside torch.no_grad()
        ("tests/fixtures/verify_batchnorm.py:evaluated", 3),  # a model.eval(): running statistics
    ],
)
def test_in_process_inference_matches_eager_bitwise(tmp_path, ref, stages):
    program = load_program(compile_to(tmp_path, ref, stages, microbatches=4))
    pipeline = InProcessPipeline(program)
    seen_requires_grad = []
    for executor in pipeline.executors:
        for stage in executor.stages.values():
            stage.register_forward_pre_hook(
                lambda module, args: seen_requires_grad.extend(
                    a.requires_grad
                    for a in args
                    if isinstance(a, torch.Tensor)  # not the sizes
                )
            )
    names = [i["name"] for i in program.data["inputs"]]
    model = pipeline.spec.module
    data = batches(program, pipeline.spec, 0)
    for _ in range(2):
        microbatches = next(data)
        losses = pipeline.evaluate(microbatches)
        with torch.no_grad():
            assert losses == [
                float(loss_of(call_forward(model, names, [mb[n] for n in names]))) for mb in microbatches
            ]

    assert seen_requires_grad and not any(seen_requires_grad)  # received tensors too
    assert all(p.grad is None for p in pipeline.named_parameters().values())
    for executor in pipeline.executors:  # forward-only frees each micro-batch once it is sent
        assert not executor.outputs and not executor.received


def test_forward_only_schedule_is_built_when_program_json_lacks_it(tmp_path):
    program = load_program(compile_to(tmp_path, "models/mlp.py:mlp_deep", 3, microbatches=4))
    built = forward_only_schedule(program)
    assert built["name"] == "forward-only" and built["microbatches"] == 4
    assert built["ranks"]["1"] == " ".join(f"1RECV_F{m} 1F{m} 1SEND_F{m}" for m in range(4))
    for text in built["ranks"].values():
        counts = Counter(a.kind for a in parse_rank_actions(text))
        assert counts[ActionKind.F] == 4 and not counts[ActionKind.B]
    if "inference_schedule" in program.data:  # the compiler's agrees with the runtime's own
        assert built["ranks"] == program.data["inference_schedule"]["ranks"]

    # Without the key the runtime uses its own schedule, with the same losses.
    data = dict(program.data)
    data.pop("inference_schedule", None)
    bare = InProcessPipeline(dataclasses.replace(program, data=data))
    microbatches = next(batches(program, bare.spec, 0))
    assert bare.evaluate(microbatches) == InProcessPipeline(program).evaluate(microbatches)


# torchrun -----------------------------------------------------------------------------------------


def test_torchrun_trace_has_both_ranks_and_the_step_times(tmp_path, mini_dir):
    path = tmp_path / "trace" / "T.json"
    result = torchrun(mini_dir, 2, "--steps", "2", "--trace", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(path.read_text())
    events = action_events(document)
    for rank in range(2):
        names = [e["name"] for e in events if e["pid"] == rank]
        schedule = load_program(mini_dir).data["schedule"]["ranks"][str(rank)].split()  # last step only
        # Then the step's end: gpt_mini's tied embedding all-reduced between the ranks, the update.
        assert names == schedule + [f"{rank}REDUCE_GRAD", f"{rank}OPT"]
    other = document["otherData"]
    assert other["traced_steps"] == [2] and other["mode"] == "training"
    step, busy = read_trace_times(path)
    assert len(busy) == 2 and 0 < max(busy) <= step
    assert other["measured_bubble"] == pytest.approx(1 - sum(busy) / (2 * step))
    # The step time is the pipeline's; what surrounds it is stated apart.
    pipeline_end = max(e["ts"] + e["dur"] for e in events if e["cat"] not in ("REDUCE_GRAD", "OPT"))
    assert step == pytest.approx(pipeline_end / 1e6)
    firsts = [min(e["ts"] for e in events if e["pid"] == rank) / 1e6 for rank in range(2)]
    assert other["start_seconds"] == pytest.approx(firsts)
    reduces = [e["dur"] / 1e6 for e in events if e["cat"] == "REDUCE_GRAD"]
    assert other["reduce_seconds"] == pytest.approx(min(reduces))
    updates = [e["dur"] / 1e6 for e in events if e["cat"] == "OPT"]
    assert other["update_seconds"] == pytest.approx(updates) and min(updates) > 0


def test_torchrun_infer_prints_eval_lines(mini_dir):
    result = torchrun(mini_dir, 2, "--steps", "2", "--infer")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("eval step")]
    assert [line.split(" | ")[0] for line in lines] == ["eval step 1/2", "eval step 2/2"]
    assert all(line.endswith("tokens/s") and " ms | " in line for line in lines)
    # The same loss as the in-process forward-only pass over the same first batch.
    program = load_program(mini_dir)
    pipeline = InProcessPipeline(program)
    losses = pipeline.evaluate(next(batches(program, pipeline.spec, 0)))
    assert f"| loss {sum(losses) / len(losses):.4f} |" in lines[0]


def test_simulate_replays_a_measured_runs_stage_times(tmp_path, mini_dir):
    """``simulate --costs-from`` takes each stage's F and B from a trace (per step the mean, over the
    steps the median) and replays the schedule."""
    program = load_program(mini_dir).data
    seconds = {"F": [0.001, 0.003, 0.001], "B": [0.002, 0.002, 0.009]}
    events, durations = [], {}
    for step in range(3):
        for rank, text in program["schedule"]["ranks"].items():
            for i, name in enumerate(text.split()):
                action = Action.parse(name)
                if action.is_compute:
                    duration = seconds[action.kind.value][action.microbatch % 3]
                    if step == 0:
                        durations.setdefault((action.stage, action.kind.value), []).append(duration)
                    elif step == 1 and name == "0F1":
                        duration = 0.5  # the machine took this step's time
                    start = 100 * step + i
                    events.append(trace_event(int(rank), name, action.kind.value, start, start + duration))
    trace = write_trace(tmp_path / "run.json", trace_document(events, ranks=[0, 1]))
    costs = run_stage_costs(json.loads(trace.read_text()))
    # Within a step the mean, not the median: a step pays for every slow action. Over the steps
    # the median, as of a run's step times: the step with the 0.5 s action moves nothing.
    mean = {key: statistics.fmean(found) for key, found in durations.items()}
    assert sorted(costs) == [0, 1]
    for s, cost in costs.items():
        assert (cost.forward, cost.backward) == pytest.approx((mean[(s, "F")], mean[(s, "B")]))
    assert costs[0].forward > statistics.median(durations[(0, "F")])
    # The replay draws each action's time from how the run's actions scattered around their means.
    jitter = action_jitter(json.loads(trace.read_text()))
    assert jitter == sorted(jitter) and jitter[0] < 1 < jitter[-1]
    expected = simulate_program(program, costs=costs, jitter=jitter).step_time
    assert expected != simulate_program(program).step_time  # not the compiler's costs
    assert expected > simulate_program(program, costs=costs).step_time  # ranks wait for the slower
    run = subprocess.run(
        [sys.executable, "-m", "ppcompile", "simulate", str(mini_dir), "--costs-from", str(trace)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert f"predicted step {expected * 1e3:.2f} ms" in run.stdout
    assert f"from stage times measured in {trace}" in run.stdout
    # A file that is not a run's trace is one line and exit code 2.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppcompile",
            "simulate",
            str(mini_dir),
            "--costs-from",
            str(mini_dir / "program.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a trace written by run.py" in bad.stderr
    )


def test_infer_says_when_the_program_evaluates_as_its_model_trains():
    from ppcompile.runtime.main import training_mode_note
    from tests.fixtures.verify_batchnorm import evaluated, model

    note = training_mode_note(model()[0])
    assert note.startswith("note: inference runs the forward as compiled, in training mode (BatchNorm1d")
    assert note.endswith("compile a factory that returns model.eval()")
    assert training_mode_note(evaluated()[0]) is None
    assert training_mode_note(build_model("models/gpt.py:gpt_mini")[0]) is None  # dropout 0: no change
