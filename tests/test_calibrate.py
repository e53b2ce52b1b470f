"""--profile times the compiled stages whole, through the runtime, and predicts with those times."""

import pytest

from ppcompile import driver
from ppcompile.context import CompileConfig
from ppcompile.driver import compile_model
from ppcompile.replay import link_of, predicted_stage_costs, simulate_program
from ppcompile.simulate import StageCosts


@pytest.fixture(scope="module")
def zero_bubble(tmp_path_factory):
    cache = tmp_path_factory.mktemp("profiles")
    config = CompileConfig(
        stages=2,
        microbatches=4,
        schedule="zb-h1",
        profile=True,
        profile_concurrency=1,
        profile_cache=str(cache),
    )
    return compile_model("models/gpt.py:gpt_mini", config).program


def test_calibration_times_every_action_kind_and_the_update(zero_bubble):
    calibrated = zero_bubble["costs"]["calibrated"]
    assert [s["stage"] for s in calibrated["stages"]] == [0, 1]
    for stage in calibrated["stages"]:
        assert stage["forward_seconds"] > 0
        # ZB-H1 runs the backward split: I and W are timed, B is their sum.
        assert stage["backward_input_seconds"] > 0 and stage["backward_weight_seconds"] > 0
        assert stage["backward_seconds"] == pytest.approx(
            stage["backward_input_seconds"] + stage["backward_weight_seconds"]
        )
    assert len(calibrated["update_seconds"]) == 2 and min(calibrated["update_seconds"]) > 0
    # gpt_mini ties lm_head to the embedding: its gradient is all-reduced before the update.
    assert calibrated["tied_bytes"] == [128 * 64 * 4]
    assert any(n.startswith("calibrated: stages timed whole") for n in zero_bubble["costs"]["notes"])


def test_prediction_uses_the_calibrated_stages(zero_bubble):
    costs = predicted_stage_costs(zero_bubble)
    for stage in zero_bubble["costs"]["calibrated"]["stages"]:
        assert costs[stage["stage"]] == StageCosts(
            stage["forward_seconds"],
            stage["backward_seconds"],
            stage["backward_input_seconds"],
            stage["backward_weight_seconds"],
        )


def test_predicted_step_ends_with_the_tied_reduction_and_the_update(zero_bubble):
    calibrated = zero_bubble["costs"]["calibrated"]
    pipeline = simulate_program(zero_bubble, costs=predicted_stage_costs(zero_bubble))
    step = simulate_program(zero_bubble)
    assert zero_bubble["costs"]["simulated_step_seconds"] == pytest.approx(step.step_time)
    # Both ranks hold the tied weight: they meet after the later one's last action.
    ends = [max(e.end for e in pipeline.events if e.rank == r) for r in (0, 1)]
    latency, bandwidth = link_of(zero_bubble)
    synced = max(ends) + latency + calibrated["tied_bytes"][0] / bandwidth
    assert step.step_time == pytest.approx(synced + max(calibrated["update_seconds"]))
    # Bubbles stay the pipeline's, as a trace measures them.
    assert step.overall_bubble_fraction == pipeline.overall_bubble_fraction
    # Without calibration (no --profile) the prediction is the pipeline alone.
    roofline = compile_model(
        "models/gpt.py:gpt_mini", CompileConfig(stages=2, microbatches=4, schedule="zb-h1")
    )
    assert "calibrated" not in roofline.program["costs"]
    assert roofline.program["costs"]["simulated_step_seconds"] == pytest.approx(
        simulate_program(roofline.program, costs=predicted_stage_costs(roofline.program)).step_time
    )


class NodeSumTimings:
    """Stands in for the whole-stage timing: each stage takes the sum of its nodes as first
    profiled, so stage and node sums agree except where a test says a timing was slow, and the
    cuts do not depend on this machine's noise. Records every timing and every partition's cut.

    ``slow``: timing number (from 0) -> (stage, factor) that timing's stage was slow by.
    ``send_seconds``: the send call's price every timing reports, as one under torchrun does."""

    def __init__(self, monkeypatch, slow: dict[int, tuple[int, float]], send_seconds: float | None = None):
        self.slow = slow
        self.send_seconds = send_seconds
        self.calls, self.cuts, self.stage_seconds = [], [], []
        self._stage_of: dict[str, int] = {}
        self._first_profiled: dict[str, tuple[float, float]] = {}
        self._real_calibration, self._real_build = driver.cached_calibration, driver._build
        monkeypatch.setattr(driver, "cached_calibration", self._timing)
        monkeypatch.setattr(driver, "_build", self._build)

    def _timing(self, *args, **kwargs):
        calibrated = self._real_calibration(*args, **kwargs)
        self.calls.append(calibrated)
        for stage in calibrated["stages"]:
            members = [name for name, s in self._stage_of.items() if s == stage["stage"]]
            stage["forward_seconds"] = sum(self._first_profiled[n][0] for n in members)
            stage["backward_seconds"] = sum(self._first_profiled[n][1] for n in members)
            stage["backward_input_seconds"] = stage["backward_weight_seconds"] = None
        if len(self.calls) - 1 in self.slow:
            stage, factor = self.slow[len(self.calls) - 1]
            for key in ("forward_seconds", "backward_seconds"):
                calibrated["stages"][stage][key] *= factor
        calibrated["send_seconds"] = self.send_seconds
        return calibrated

    def _build(self, gm, ctx, schedule):
        self.cuts.append(ctx.partition.cut_positions[0])
        self.stage_seconds.append([0.0] * ctx.num_stages)  # each build's stages, in first-profiled node time
        self._stage_of.clear()
        for node in gm.graph.nodes:
            if "ppc.cost" in node.meta and node.meta.get("ppc.stage") is not None:
                self._stage_of[node.name] = node.meta["ppc.stage"]
                cost = node.meta["ppc.cost"]
                self._first_profiled.setdefault(node.name, (cost.forward_time, cost.backward_time))
                self.stage_seconds[-1][node.meta["ppc.stage"]] += sum(self._first_profiled[node.name])
        return self._real_build(gm, ctx, schedule)


def test_a_stage_slower_whole_than_its_nodes_gets_cut_again(tmp_path, monkeypatch):
    """Where a stage timed whole runs at a larger multiple of its node sum than the others, its node
    times are scaled up and the partition cut again: that stage gives work away."""
    config = CompileConfig(
        stages=2, microbatches=4, profile=True, profile_concurrency=1, profile_cache=str(tmp_path)
    )
    with monkeypatch.context() as patch:
        agreeing = NodeSumTimings(patch, slow={})
        plain = compile_model("models/gpt.py:gpt_mini", config)
    assert len(agreeing.calls) == 1  # whole stages that agree with their nodes: no second cut
    slow = NodeSumTimings(monkeypatch, slow={0: (-1, 2.0)})
    recut = compile_model("models/gpt.py:gpt_mini", config)
    # The new stages were timed too, and then at most one more partition the averaged evidence chose.
    assert 2 <= len(slow.calls) <= driver.MAX_TIMED_PARTITIONS
    assert any(
        "cut again" in n and f"{len(slow.calls)} partition(s) timed whole" in n
        for n in recut.program["costs"]["notes"]
    )
    # The fake slowness is one of the last stage's timings: averaged, it still gives work away.
    assert recut.ctx.partition.cut_positions[0] > plain.ctx.partition.cut_positions[0]
    assert any(recut.program["costs"]["calibrated"] is c for c in slow.calls[1:])


def test_ranks_sharing_this_machine_time_their_stages_under_torchrun(tmp_path, monkeypatch):
    """With the K ranks on this machine's cores (the CPU default), the stages are timed as they
    will run: the program under torchrun, each stage the mean of a trace of every action."""
    from ppcompile import calibrate

    launched = []
    real = calibrate.traced_stage_costs

    def recorded(program_dir, ranks, optimizer, traced_steps):
        launched.append((ranks, optimizer, traced_steps))
        return real(program_dir, ranks, optimizer, traced_steps)

    monkeypatch.setattr(calibrate, "traced_stage_costs", recorded)
    config = CompileConfig(stages=2, microbatches=4, optimizer="sgd", profile=True, profile_cache=None)
    program = compile_model("models/gpt.py:gpt_mini", config).program
    calibrated = program["costs"]["calibrated"]
    assert launched and launched[0][:2] == (2, "sgd")
    # gpt_mini's steps take milliseconds: about two seconds of them are traced, up to the cap.
    assert calibrate.TIMED_STEPS < launched[0][2] <= calibrate.MAX_TRACED_STEPS
    assert calibrated["stages_timed"] == "under torchrun, 2 ranks at once"
    assert all(s["forward_seconds"] > 0 and s["backward_seconds"] > 0 for s in calibrated["stages"])
    assert any("(under torchrun, 2 ranks at once)" in n for n in program["costs"]["notes"])
    # Around the pipeline, as the ranks ran it: each rank posts its receives before its first
    # action, gpt_mini's tied embedding is all-reduced between the ranks, each rank updates.
    assert len(calibrated["start_seconds"]) == 2 and min(calibrated["start_seconds"]) > 0
    assert calibrated["reduce_seconds"] > 0
    # Beside each stage's wall time, its rank's CPU time in it, which cannot be longer.
    for stage in calibrated["stages"]:
        for kind in ("forward", "backward"):
            assert 0 < stage[f"{kind}_cpu_seconds"] <= stage[f"{kind}_seconds"] * 1.05 + 50e-6
    assert any("the ranks' CPU time in them" in n for n in program["costs"]["notes"])
    assert len(calibrated["update_seconds"]) == 2 and min(calibrated["update_seconds"]) > 0
    # How the actions scattered around their means: 21 quantiles, the simulator draws from them.
    jitter = calibrated["jitter"]
    assert len(jitter) == 21 and jitter == sorted(jitter) and jitter[0] <= 1 <= jitter[-1]
    # The prediction starts each rank that late and prices the all-reduce as it was timed.
    predicted = simulate_program(program)
    assert program["costs"]["simulated_step_seconds"] == pytest.approx(predicted.step_time)
    from_zero = simulate_program(program, start_seconds=[0.0, 0.0]).events
    first = {e.rank: e.start for e in predicted.events[::-1]}
    assert first == pytest.approx(dict(enumerate(calibrated["start_seconds"])))
    assert min(e.start for e in from_zero) == 0


def test_a_failed_torchrun_calibration_is_one_clear_error(tmp_path, monkeypatch):
    import subprocess

    from ppcompile import calibrate
    from ppcompile.errors import CompileError

    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Traceback ...\nRuntimeError: no free port\n")

    monkeypatch.setattr(calibrate.subprocess, "run", failing_run)
    config = CompileConfig(stages=2, microbatches=4, profile=True, profile_cache=None)
    with pytest.raises(
        CompileError,
        match=r"under torchrun failed \(RuntimeError: no free port\); use --profile-concurrency 1",
    ):
        compile_model("models/gpt.py:gpt_mini", config)


def test_one_slow_timing_is_outvoted_by_the_timings_after_it(tmp_path, monkeypatch):
    """A stage timed once at twice its speed moves the cuts; the next timing of the new stages
    disagrees, the node times are scaled by the geometric mean of both, and the cuts move back
    part of the way."""
    config = CompileConfig(
        stages=2, microbatches=4, profile=True, profile_concurrency=1, profile_cache=str(tmp_path)
    )
    timings = NodeSumTimings(monkeypatch, slow={0: (-1, 2.0)})
    result = compile_model("models/gpt.py:gpt_mini", config)
    assert len(timings.calls) == driver.MAX_TIMED_PARTITIONS
    plain, after_the_slow_timing, final = timings.cuts
    assert plain < final < after_the_slow_timing
    assert result.program["costs"]["calibrated"] is timings.calls[-1]


def test_the_partition_timed_best_balanced_is_kept(tmp_path, monkeypatch):
    """The cuts move while timings disagree, but a later partition can time worse than an earlier
    one: the program kept is the one whose timing was best balanced, cut again as it was."""
    config = CompileConfig(
        stages=2, microbatches=4, profile=True, profile_concurrency=1, profile_cache=str(tmp_path)
    )
    # The first partition times a little off (cut again), the later ones far off.
    timings = NodeSumTimings(monkeypatch, slow={0: (-1, 1.3), 1: (0, 2.0), 2: (-1, 2.0)})
    result = compile_model("models/gpt.py:gpt_mini", config)
    program = result.program
    assert len(timings.calls) >= 2
    imbalances = [driver.timed_imbalance(program, c) for c in timings.calls]
    best = imbalances.index(min(imbalances))
    assert best == 0
    assert program["costs"]["calibrated"] is timings.calls[best]
    # The kept program is the first partition's: its cut, rebuilt after the last timing's.
    assert result.ctx.partition.cut_positions[0] == timings.cuts[best] == timings.cuts[-1]
    assert len(timings.cuts) == len(timings.calls) + 1
    assert any(
        f"kept the partition timed best balanced, slowest over mean stage (send calls included) {min(imbalances):.3f}"
        in n
        for n in program["costs"]["notes"]
    )


def test_send_calls_count_each_stage_s_sends_per_microbatch():
    """A middle stage sends activations on and gradients back: two calls per micro-batch."""
    program = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=3, microbatches=4)).program
    assert driver.send_calls(program) == [1, 2, 1]


def test_stage_costs_read_in_cpu_time():
    """A trace's actions state the CPU time their rank spent in them; costs can be read in it."""
    from ppcompile.replay import measured_stage_costs, run_stage_costs
    from ppcompile.runtime.trace import trace_document, trace_event

    events = [
        trace_event(0, "0F0", "F", 0.0, 1.0, cpu_seconds=0.5),
        trace_event(0, "0B0", "B", 1.0, 3.0, cpu_seconds=1.5),
    ]
    document = trace_document(events, [0])
    assert measured_stage_costs(document)[0] == StageCosts(1.0, 2.0)
    assert measured_stage_costs(document, clock="cpu")[0] == StageCosts(0.5, 1.5)
    assert run_stage_costs(document, clock="cpu")[0] == StageCosts(0.5, 1.5)
    with pytest.raises(ValueError, match="use one of wall, cpu"):
        measured_stage_costs(document, clock="cycles")


def test_send_calls_timed_in_the_runtime_reprice_the_cuts(tmp_path, monkeypatch):
    """A middle stage sends both ways, so the partitioner gives it less to compute by one send
    call's price. Where the runtime's timing prices the call unlike the profile's probe (here: 0
    probed in one process, half a stage timed), the program is cut again at the timed price."""
    config = CompileConfig(
        stages=3, microbatches=6, profile=True, profile_concurrency=1, profile_cache=str(tmp_path)
    )
    with monkeypatch.context() as patch:
        NodeSumTimings(patch, slow={})
        plain = compile_model("models/gpt.py:gpt_mini", config)
    assert plain.program["costs"]["link"]["send_seconds"] == 0
    price = 0.5 * plain.program["costs"]["total_compute_seconds"] / 3
    timings = NodeSumTimings(monkeypatch, slow={}, send_seconds=price)
    priced = compile_model("models/gpt.py:gpt_mini", config)
    assert len(timings.calls) >= 2  # the send price moved: cut again, and the new stages timed
    first, second = timings.stage_seconds[:2]
    assert second[1] < first[1]  # the middle stage gave work away
    assert priced.program["costs"]["link"]["send_seconds"] == pytest.approx(price)
    assert any("send calls priced at" in n for n in priced.program["costs"]["notes"])
    # The program kept is the partition best balanced with each stage's send calls at that price.
    assert driver.send_calls(priced.program) == [1, 2, 1]
    imbalances = [driver.timed_imbalance(priced.program, c) for c in timings.calls]
    assert imbalances[1] < imbalances[0]
    assert priced.program["costs"]["calibrated"] is timings.calls[imbalances.index(min(imbalances))]
