"""The compiler, top to bottom: trace, run the passes in order, schedule, write the program.

Example::

    result = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=2))
    write_program("build/mini", result.program, result.files)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from dataclasses import dataclass

from torch import fx

from ppcompile.calibrate import cached_calibration, calibration_note
from ppcompile.context import CompileConfig, CompileContext
from ppcompile.errors import CompileError, PassError
from ppcompile.frontend import load_context, trace
from ppcompile.memory import OPTIMIZER_MEMORY
from ppcompile.passes.cost_at_dims import cost_at_dims
from ppcompile.passes.divide_layers import divide_layers
from ppcompile.passes.estimate_costs import estimate_costs
from ppcompile.passes.fit_cost_formulas import fit_cost_formulas
from ppcompile.passes.fuse_loss import fuse_loss
from ppcompile.passes.join_layers import join_layers
from ppcompile.passes.order_mutations import order_mutations
from ppcompile.passes.partition_stages import partition_stages
from ppcompile.passes.plan_memory import plan_memory
from ppcompile.passes.profile_costs import profile_costs
from ppcompile.passes.propagate_shapes import propagate_shapes
from ppcompile.passes.split_stages import split_stages
from ppcompile.program import add_simulation, build_program
from ppcompile.replay import program_schedule, recompute_seconds, simulate_program
from ppcompile.report import render_report
from ppcompile.runtime.actions import ActionKind
from ppcompile.schedules import Schedule, ScheduleError, lower_communication, make_schedule
from ppcompile.simulate import StageCosts, simulate
from ppcompile.spare_cores import plan_spare_cores, spare_cores_note
from ppcompile.verify import verify

PASSES = [
    # Reads after an in-place update read the update, so cuts cannot split them.
    ("order_mutations", order_mutations),
    # Concrete and symbolic shapes ([b, s, 768]) of every value.
    ("propagate_shapes", propagate_shapes),
    # The LM head and its cross-entropy as one blockwise call, where that saves memory.
    ("fuse_loss", fuse_loss),
    # FLOPs, bytes, activations saved for backward and roofline time per node.
    ("estimate_costs", estimate_costs),
    # The same costs as polynomials in b, s.
    ("fit_cost_formulas", fit_cost_formulas),
    # With --dims (or a split of --global-batch), the costs at that micro-batch shape.
    ("cost_at_dims", cost_at_dims),
    # With --profile: forward and backward time of every node measured on the real device.
    ("profile_costs", profile_costs),
    # Linear layers near where even stages would meet as bands of columns, so cuts may divide them.
    ("divide_layers", divide_layers),
    # K contiguous stages minimising the slowest one, transfers included, within the memory budget.
    ("partition_stages", partition_stages),
    # Peak memory per rank; recompute layers in backward where a rank is over budget.
    ("plan_memory", plan_memory),
    # Layers no cut divides whole again; a divided one as one band of columns per stage.
    ("join_layers", join_layers),
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


def compile_model(ref: str, config: CompileConfig, traced: Traced | None = None) -> CompileResult:
    """The program for ``config``; ``traced``, where given, is the model as :func:`trace_and_cost`
    made it for a config that differs in shape, schedule or split only (the auto choices)."""
    _check_config(config)
    if config.microbatches == "auto":
        return compile_microbatch_choice(ref, config, traced)
    if config.global_batch is not None:
        config = split_global_batch(config)
    if config.schedule == "auto":
        return compile_auto(ref, config, traced)
    if not isinstance(config.microbatches, int) or config.microbatches < 1:
        raise CompileError(f"--microbatches must be a count of at least 1 or auto, got {config.microbatches}")
    schedule = _schedule(config)  # fail on a bad schedule before the expensive passes
    traced = traced or trace_and_cost(ref, config)
    ctx = traced.context_for(config)
    ctx.live_microbatches = list(
        simulate(schedule, {s: StageCosts(0, 0) for s in range(ctx.num_stages)}, set()).peak_live_microbatches
    )
    uncut = _run_passes(_graph_copy(traced.gm), ctx, PASSES[SHARED_UNTIL:REPARTITION_FROM])
    gm = _run_passes(_graph_copy(uncut), ctx, PASSES[REPARTITION_FROM:])
    lowered, program, files = _build(gm, ctx, schedule)
    if config.profile:
        # Node sums miss the runtime's own work, and a node timed alone is noisier than a stage:
        # time the stages whole, and cut again where that changes the balance.
        gm, lowered, program, files = _calibrate(uncut, gm, ctx, schedule, lowered, program, files)
    if ctx.spare_cores is not None:
        # What runs while the other ranks wait follows from the step as simulated without it.
        plan_spare_cores(program, simulate_program(program), *ctx.spare_cores)
        if note := spare_cores_note(program):
            program["costs"]["notes"].append(note)
    # The prediction is made from program.json alone, as `ppcompile simulate` makes it later.
    add_simulation(program, simulate_program(program))
    files["report.md"] = render_report(program)
    return CompileResult(ctx, gm, lowered, program, files)


def _check_config(config: CompileConfig) -> None:
    """The errors a config has whatever the model: before anything is traced."""
    if config.global_batch is not None and config.global_batch < 1:
        raise CompileError(f"--global-batch must be at least 1 row, got {config.global_batch}")
    if config.stages < 1:
        raise CompileError(f"--stages must be at least 1, got {config.stages}")
    if config.profile_concurrency is not None and config.profile_concurrency < 1:
        raise CompileError(
            f"--profile-concurrency must be at least 1, got {config.profile_concurrency}; "
            "1 times every node alone"
        )
    if config.fuse_loss and not config.trains:
        raise CompileError(
            "--fuse-loss computes the loss without its logits, but --schedule forward-only compiles the "
            "model for inference, returning what forward returns; leave out one of the two"
        )
    if config.optimizer not in OPTIMIZER_MEMORY:
        raise CompileError(f"--optimizer {config.optimizer!r}: use one of {', '.join(OPTIMIZER_MEMORY)}")


# The passes every shape, schedule and split of one model share: they read none of those.
SHARED_UNTIL = [name for name, _ in PASSES].index("cost_at_dims")


@dataclass(frozen=True)
class Traced:
    """The model traced and costed at the example's micro-batch shape, as polynomials in its dims:
    what the programs ``--schedule auto`` and ``--microbatches auto`` compare all start from, so
    the model is traced once however many they compile."""

    ctx: CompileContext  # as the passes before SHARED_UNTIL left it
    gm: fx.GraphModule

    def context_for(self, config: CompileConfig) -> CompileContext:
        """A context of its own for compiling ``config`` from here: later passes rewrite its lists."""
        shared = self.ctx
        return dataclasses.replace(
            shared,
            config=config,
            **{
                f.name: copy.copy(getattr(shared, f.name))
                for f in dataclasses.fields(shared)
                if isinstance(getattr(shared, f.name), (list, dict))
            },
        )


def trace_and_cost(ref: str, config: CompileConfig) -> Traced:
    """Build the model on the meta device, trace it and run the passes before SHARED_UNTIL."""
    ctx = load_context(ref, config)
    if config.global_batch is not None and "b" not in ctx.symbol_values:
        raise CompileError(
            f"--global-batch splits the batch dim b, but {ref}'s inputs name no dim b (its dims: "
            f"{', '.join(sorted(ctx.symbol_values)) or 'none'}); name the batch dim b in ModelSpec.dims"
        )
    return Traced(ctx, _run_passes(trace(ctx), ctx, PASSES[:SHARED_UNTIL]))


def _run_passes(gm: fx.GraphModule, ctx: CompileContext, passes) -> fx.GraphModule:
    for name, run_pass in passes:
        try:
            gm = run_pass(gm, ctx)
        except CompileError:
            raise
        except Exception as e:
            raise PassError(name, e) from e
        if ctx.config.check:
            verify(gm, ctx, done=[n for n, _ in PASSES[: PASSES.index((name, run_pass)) + 1]])
    return gm


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with a graph of its own (node metadata copied, modules shared), for passes from the
    partitioner on to rewrite: every partition is cut from the same uncut graph."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)


def _build(
    gm: fx.GraphModule, ctx: CompileContext, schedule: Schedule
) -> tuple[Schedule, dict, dict[str, str]]:
    """The lowered schedule, program.json's content and the stage files for the current partition."""
    config = ctx.config
    edges = {(b.producer, c) for b in ctx.boundaries.values() for c in b.consumers}
    grad_edges = {(b.producer, c) for b in ctx.boundaries.values() if b.requires_grad for c in b.consumers}
    lowered = lower_communication(schedule, edges, grad_edges)
    # The same program runs forward-only (run.py --infer) on this schedule.
    inference = make_schedule("forward-only", config.stages, config.microbatches, config.virtual_stages)
    inference = lower_communication(inference, edges, set())
    program, files = build_program(gm, ctx, lowered, inference)
    return lowered, program, files


# Whole stages whose node sums are off by factors further apart than this get cut again, by the
# passes from the partitioner on.
REBALANCE_SPREAD = 1.03
REPARTITION_FROM = [name for name, _ in PASSES].index("divide_layers")
# Partitions timed whole at most: the first, then each one the evidence so far moves the cuts to.
# One timing of a stage on a shared machine can be 20% off; a second and third catch that.
MAX_TIMED_PARTITIONS = 3
# A send call's price timed in the runtime further than this from the profile's probe (a fraction
# of the probe's) gets the program cut again at that price.
SEND_PRICE_TOLERANCE = 0.15


@dataclass(frozen=True)
class _TimedPartition:
    node_costs: dict  # node name -> the ppc.cost it was cut with
    send_seconds: float  # the send call's price it was cut with
    calibrated: dict
    imbalance: float  # timed_imbalance of its program under that timing


def _calibrate(uncut, gm, ctx, schedule, lowered, program, files):
    """Time the program's stages whole; where they ran at different multiples of their node sums,
    scale the node times to match, cut again, and time the new stages; repeat while the cuts move.

    A node's multiple is the geometric mean of what every timing of the stage it sat in asked
    for, so one slow timing moves the cuts less the more timings disagree with it. Under torchrun
    the timings also price a send call as the runtime makes it (the mean over the timings), which
    replaces the profile's probe of the link. The program kept is the partition timed best
    balanced (:func:`timed_imbalance`), as each timing measured it."""
    config = ctx.config

    def timed(program, files):
        return cached_calibration(
            config.profile_cache,
            ctx.profile_key,
            program,
            files,
            optimizer=config.optimizer,
            device=ctx.profiled_on,
            threads=config.profile_threads,
            slowdown=ctx.profile_slowdown,
            shared_machine=ctx.profile_shared_machine,
        )

    def cut(costs, send_seconds):
        ctx.profile = dataclasses.replace(ctx.profile, send_overhead=send_seconds)
        for node in uncut.graph.nodes:
            if node.name in costs:
                node.meta["ppc.cost"] = costs[node.name]
        cut_gm = _run_passes(_graph_copy(uncut), ctx, PASSES[REPARTITION_FROM:])
        return (cut_gm, *_build(cut_gm, ctx, schedule))

    profiled = {n.name: n.meta["ppc.cost"] for n in uncut.graph.nodes if "ppc.cost" in n.meta}
    evidence: dict[str, list[float]] = {name: [] for name in profiled}
    probed_send = ctx.profile.send_overhead
    sends_timed: list[float] = []

    def multiple(name: str) -> float:
        return statistics.geometric_mean(evidence[name]) if evidence[name] else 1.0

    def send_price() -> float:
        return statistics.fmean(sends_timed) if sends_timed else probed_send

    def timed_partition(costs, program, files) -> _TimedPartition:
        cut_with = ctx.profile.send_overhead
        calibrated = timed(program, files)
        if calibrated.get("send_seconds") is not None:
            sends_timed.append(calibrated["send_seconds"])
        return _TimedPartition(costs, cut_with, calibrated, timed_imbalance(program, calibrated))

    first = timed_partition(profiled, program, files)
    calibrated = first.calibrated
    timed_partitions = {_stage_code_key(files): first}
    # The first cut priced send calls by the probe; cut again where the runtime's differ from it.
    send_moved = abs(send_price() - probed_send) > SEND_PRICE_TOLERANCE * max(probed_send, 1e-9)
    rounds = []
    while True:
        factors = whole_over_node_sums(program, calibrated)
        rounds.append(factors)
        if len(rounds) == 1 and max(factors) <= REBALANCE_SPREAD * min(factors) and not send_moved:
            break
        if len(timed_partitions) == MAX_TIMED_PARTITIONS:
            break
        for node in gm.graph.nodes:
            stage = node.meta.get("ppc.stage")
            # The bands of a divided layer speak for the layer; its join is costed from them.
            name = node.meta.get("ppc.piece_of", node.name)
            if stage is not None and name in evidence and "ppc.joins" not in node.meta:
                evidence[name].append(multiple(name) * factors[stage])
        costs = {
            name: dataclasses.replace(
                cost,
                forward_time=cost.forward_time * multiple(name),
                backward_time=cost.backward_time * multiple(name),
            )
            for name, cost in profiled.items()
        }
        gm, lowered, program, files = cut(costs, send_price())
        key = _stage_code_key(files)
        if key in timed_partitions:
            calibrated = timed_partitions[key].calibrated
            break
        timed_partitions[key] = timed_partition(costs, program, files)
        calibrated = timed_partitions[key].calibrated
    best_key = min(timed_partitions, key=lambda k: timed_partitions[k].imbalance)
    best = timed_partitions[best_key]
    if best_key != _stage_code_key(files):
        # An earlier partition timed better: cut it again from the node costs it was cut with.
        gm, lowered, program, files = cut(best.node_costs, best.send_seconds)
        assert _stage_code_key(files) == best_key, "the same node costs cut differently"
        calibrated = best.calibrated
    if len(rounds) > 1:
        program["costs"]["notes"].append(
            f"calibrated: {len(timed_partitions)} partition(s) timed whole; their stages ran at "
            + "; ".join(", ".join(f"{f:.2f}" for f in factors) for factors in rounds)
            + "x their node sums; node times scaled by the geometric mean of their stages' factors"
            + (
                f", send calls priced at the {send_price() * 1e6:.0f} us the runtime took"
                if sends_timed
                else ""
            )
            + " and cut again"
            + ("" if len(timed_partitions) > 1 else " (the cuts stayed)")
            + "; kept the partition timed best balanced, slowest over mean stage (send calls included) "
            + f"{best.imbalance:.3f}"
        )
    # The simulator prices the kept program's send calls as the runtime made them.
    ctx.profile = dataclasses.replace(ctx.profile, send_overhead=send_price())
    program["costs"]["link"]["send_seconds"] = send_price()
    program["costs"]["calibrated"] = calibrated
    program["costs"]["notes"].append(calibration_note(program))
    return gm, lowered, program, files


def _stage_code_key(files: dict[str, str]) -> str:
    """Stage code decides what a timing measured: equal code, equal stages."""
    return json.dumps(sorted((name, text) for name, text in files.items() if name.endswith(".py")))


def send_calls(program: dict) -> list[float]:
    """Per stage, the send calls (SEND_F and SEND_B) its rank makes per micro-batch."""
    schedule = program_schedule(program)
    calls = [0] * len(program["stages"])
    for actions in schedule.actions.values():
        for action in actions:
            if action.kind in (ActionKind.SEND_F, ActionKind.SEND_B):
                calls[action.stage] += 1
    return [c / schedule.microbatches for c in calls]


def timed_imbalance(program: dict, calibrated: dict) -> float:
    """The slowest stage over the mean stage, each its forward + backward per micro-batch as
    timed whole plus its send calls, at their price in that timing where it has one, else the
    link's: what the partitioner balances."""
    send = calibrated.get("send_seconds")
    if send is None:
        send = program["costs"]["link"]["send_seconds"]
    seconds = [
        s["forward_seconds"] + s["backward_seconds"] + calls * send
        for s, calls in zip(calibrated["stages"], send_calls(program))
    ]
    return max(seconds) * len(seconds) / sum(seconds)


def whole_over_node_sums(program: dict, calibrated: dict) -> list[float]:
    """Per stage: its forward + backward timed whole over the sum of its nodes (recompute included)."""
    recompute = recompute_seconds(program)
    return [
        (whole["forward_seconds"] + whole["backward_seconds"]) / (summed["compute_seconds"] + recompute[s])
        for s, (whole, summed) in enumerate(zip(calibrated["stages"], program["costs"]["stages"]))
    ]


def _schedule(config: CompileConfig) -> Schedule:
    try:
        return make_schedule(config.schedule, config.stages, config.microbatches, config.virtual_stages)
    except ScheduleError as e:
        raise CompileError(str(e)) from None


def compile_auto(ref: str, config: CompileConfig, traced: Traced | None = None) -> CompileResult:
    """Compile every schedule (and V) the simulator can evaluate, keep those within the memory
    budget, and return the one with the shortest predicted step; the program records why."""
    candidates = [
        (
            {"schedule": name, "virtual_stages": V},
            dataclasses.replace(config, schedule=name, virtual_stages=V),
        )
        for name, V in AUTO_CANDIDATES
    ]
    best, tried = _fastest(ref, candidates, traced or trace_and_cost(ref, config))
    if best is None:
        raise _none_fits(
            tried, "--schedule auto: no schedule fits", lambda t: f"{t['schedule']} V={t['virtual_stages']}"
        )
    best.program["costs"]["auto"] = tried
    best.files["report.md"] = render_report(best.program)
    return best


def _fastest(
    ref: str, candidates: list[tuple[dict, CompileConfig]], traced: Traced
) -> tuple[CompileResult | None, list[dict]]:
    """Compile each candidate config; the one with the shortest predicted step (the first of a tie),
    or None where none compiled, and per candidate its label with what it was predicted to take
    (step, bubble, peak memory, layers recomputed) or why it was rejected."""
    tried, best = [], None
    for label, candidate in candidates:
        try:
            result = compile_model(ref, candidate, traced)
        except CompileError as e:
            tried.append({**label, "rejected": str(e)})
            continue
        costs, schedule = result.program["costs"], result.program["schedule"]
        tried.append(
            {
                **label,
                "schedule": schedule["name"],
                "virtual_stages": schedule["virtual_stages"],
                "step_seconds": costs["simulated_step_seconds"],
                "bubble": costs["simulated_bubble"],
                "peak_bytes": max(m["total"] for m in costs["memory"]),
                "recomputed": len(costs["recomputed"]),
            }
        )
        if best is None or costs["simulated_step_seconds"] < best.program["costs"]["simulated_step_seconds"]:
            best = result
    return best, tried


def _none_fits(tried: list[dict], message: str, label) -> CompileError:
    """The error where no candidate compiled: the one reason where all share it (the model's fault,
    whatever was tried), else each candidate's."""
    if len({t["rejected"] for t in tried}) == 1:
        return CompileError(tried[0]["rejected"])
    reasons = "; ".join(f"{label(t)}: {t['rejected']}" for t in tried)
    return CompileError(f"{message} ({reasons})")


def split_global_batch(config: CompileConfig) -> CompileConfig:
    """``config`` with the micro-batch size b that splits ``--global-batch`` into ``--microbatches``,
    as ``--dims b=...`` gives it.

    >>> split_global_batch(CompileConfig(stages=2, microbatches=4, global_batch=32)).dims
    {'b': 8}
    """
    N, M = config.global_batch, config.microbatches
    if not isinstance(M, int) or M < 1 or N % M:
        raise CompileError(
            f"--global-batch {N} does not split into {M} micro-batches of equal size; use --microbatches "
            f"{', '.join(map(str, _divisors(N)))} or auto"
        )
    given = (config.dims or {}).get("b")
    if given is not None and given != N // M:
        raise CompileError(
            f"--dims b={given} but --global-batch {N} in {M} micro-batches makes b={N // M}; give one of the two"
        )
    return dataclasses.replace(config, dims={**(config.dims or {}), "b": N // M})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def compile_microbatch_choice(ref: str, config: CompileConfig, traced: Traced | None = None) -> CompileResult:
    """With ``--microbatches auto``: compile ``--global-batch`` split into every number of equal
    micro-batches M, each of b = N / M rows, and return the program with the shortest predicted
    step among those that fit the memory budget (fewer micro-batches on a tie); the program
    records every split. More micro-batches shrink the pipeline's bubble and the activations in
    flight, but run each layer on fewer rows, where its fixed costs (reading the weights, the
    per-operator overhead, each message's latency) weigh more."""
    if config.global_batch is None:
        raise CompileError(
            "--microbatches auto chooses how to split a batch of a given size: give --global-batch N, "
            "the rows of one optimizer step (e.g. --global-batch 64)"
        )
    if "b" in (config.dims or {}):
        raise CompileError(
            f"--microbatches auto gives b its size in each split (--global-batch / M), but --dims sets "
            f"b={config.dims['b']}; leave b out of --dims"
        )
    N = config.global_batch
    candidates = [
        ({"microbatches": M, "micro_batch_rows": N // M}, dataclasses.replace(config, microbatches=M))
        for M in _divisors(N)
    ]
    best, tried = _fastest(ref, candidates, traced or trace_and_cost(ref, config))
    if best is None:
        raise _none_fits(
            tried,
            f"--microbatches auto: no split of --global-batch {N} fits",
            lambda t: f"M={t['microbatches']}",
        )
    best.program["costs"]["microbatch_choice"] = tried
    best.files["report.md"] = render_report(best.program)
    return best
