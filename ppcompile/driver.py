"""The compiler, top to bottom: trace, run the passes in order, schedule, write the program.

Example::

    result = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=2))
    write_program("build/mini", result.program, result.files)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import fx

from ppcompile.calibrate import calibrate, calibration_note
from ppcompile.context import CompileConfig, CompileContext
from ppcompile.errors import CompileError, PassError
from ppcompile.frontend import load_context, trace
from ppcompile.memory import OPTIMIZER_STATE_FACTOR
from ppcompile.passes.estimate_costs import estimate_costs
from ppcompile.passes.fit_cost_formulas import fit_cost_formulas
from ppcompile.passes.order_mutations import order_mutations
from ppcompile.passes.partition_stages import partition_stages
from ppcompile.passes.plan_memory import plan_memory
from ppcompile.passes.profile_costs import profile_costs
from ppcompile.passes.propagate_shapes import propagate_shapes
from ppcompile.passes.split_stages import split_stages
from ppcompile.program import add_simulation, build_program
from ppcompile.replay import simulate_program
from ppcompile.report import render_report
from ppcompile.schedules import Schedule, ScheduleError, lower_communication, make_schedule
from ppcompile.simulate import StageCosts, simulate
from ppcompile.verify import verify

PASSES = [
    # Reads after an in-place update read the update, so cuts cannot split them.
    ("order_mutations", order_mutations),
    # Concrete and symbolic shapes ([b, s, 768]) of every value.
    ("propagate_shapes", propagate_shapes),
    # FLOPs, bytes, activations saved for backward and roofline time per node.
    ("estimate_costs", estimate_costs),
    # The same costs as polynomials in b, s; with --dims, costs at that micro-batch shape.
    ("fit_cost_formulas", fit_cost_formulas),
    # With --profile: forward and backward time of every node measured on the real device.
    ("profile_costs", profile_costs),
    # K contiguous stages minimising the slowest one, transfers included, within the memory budget.
    ("partition_stages", partition_stages),
    # Peak memory per rank; recompute layers in backward where a rank is over budget.
    ("plan_memory", plan_memory),
    # One graph per stage, with receive and send ports and tied parameters.
    ("split_stages", split_stages),
]


@dataclass
class CompileResult:
    ctx: CompileContext
    gm: fx.GraphModule
    schedule: Schedule
    program: dict
    files: dict[str, str]


AUTO_CANDIDATES = [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 4)]


def compile_model(ref: str, config: CompileConfig) -> CompileResult:
    if config.schedule == "auto":
        return compile_auto(ref, config)
    if config.stages < 1:
        raise CompileError(f"--stages must be at least 1, got {config.stages}")
    if config.microbatches < 1:
        raise CompileError(f"--microbatches must be at least 1, got {config.microbatches}")
    if config.profile_concurrency is not None and config.profile_concurrency < 1:
        raise CompileError(
            f"--profile-concurrency must be at least 1, got {config.profile_concurrency}; "
            "1 times every node alone"
        )
    ctx = load_context(ref, config)
    schedule = _schedule(config)  # fail on a bad schedule before the expensive passes
    if config.optimizer not in OPTIMIZER_STATE_FACTOR:
        raise CompileError(
            f"--optimizer {config.optimizer!r}: use one of {', '.join(OPTIMIZER_STATE_FACTOR)}"
        )
    ctx.live_microbatches = list(
        simulate(schedule, {s: StageCosts(0, 0) for s in range(ctx.num_stages)}, set()).peak_live_microbatches
    )
    gm = trace(ctx)
    for index, (name, run_pass) in enumerate(PASSES):
        try:
            gm = run_pass(gm, ctx)
        except CompileError:
            raise
        except Exception as e:
            raise PassError(name, e) from e
        if config.check:
            verify(gm, ctx, done=[n for n, _ in PASSES[: index + 1]])
    edges = {(b.producer, c) for b in ctx.boundaries.values() for c in b.consumers}
    grad_edges = {(b.producer, c) for b in ctx.boundaries.values() if b.requires_grad for c in b.consumers}
    schedule = lower_communication(schedule, edges, grad_edges)
    # The same program runs forward-only (run.py --infer) on this schedule.
    inference = make_schedule("forward-only", config.stages, config.microbatches, config.virtual_stages)
    inference = lower_communication(inference, edges, set())
    program, files = build_program(gm, ctx, schedule, inference)
    if config.profile:
        # Node sums miss the runtime's own work and the optimizer step: time the stages whole.
        calibrated = calibrate(
            program, files, config.optimizer, ctx.profiled_on, config.profile_threads, ctx.profile_slowdown
        )
        program["costs"]["calibrated"] = calibrated
        program["costs"]["notes"].append(calibration_note(program))
    # The prediction is made from program.json alone, as `ppcompile simulate` makes it later.
    add_simulation(program, simulate_program(program))
    files["report.md"] = render_report(program)
    return CompileResult(ctx, gm, schedule, program, files)


def _schedule(config: CompileConfig) -> Schedule:
    try:
        return make_schedule(config.schedule, config.stages, config.microbatches, config.virtual_stages)
    except ScheduleError as e:
        raise CompileError(str(e)) from None


def compile_auto(ref: str, config: CompileConfig) -> CompileResult:
    """Compile every schedule (and V) the simulator can evaluate, keep those within the memory
    budget, and return the one with the shortest predicted step; the program records why."""
    tried, best = [], None
    for name, V in AUTO_CANDIDATES:
        candidate = dataclasses.replace(config, schedule=name, virtual_stages=V)
        try:
            result = compile_model(ref, candidate)
        except CompileError as e:
            tried.append({"schedule": name, "virtual_stages": V, "rejected": str(e)})
            continue
        costs = result.program["costs"]
        tried.append(
            {
                "schedule": name,
                "virtual_stages": V,
                "step_seconds": costs["simulated_step_seconds"],
                "bubble": costs["simulated_bubble"],
                "peak_bytes": max(m["total"] for m in costs["memory"]),
                "recomputed": len(costs["recomputed"]),
            }
        )
        if best is None or costs["simulated_step_seconds"] < best.program["costs"]["simulated_step_seconds"]:
            best = result
    if best is None:
        reasons = "; ".join(f"{t['schedule']} V={t['virtual_stages']}: {t['rejected']}" for t in tried)
        raise CompileError(f"--schedule auto: no schedule fits ({reasons})")
    best.program["costs"]["auto"] = tried
    best.files["report.md"] = render_report(best.program)
    return best
