"""Time the compiled program's own stages as the runtime runs them (``--profile``).

The partitioner needs a cost for every node, so ``profile_costs`` times nodes one by one. A
node sum misses what only a whole stage run by the runtime has: receiving and detaching its
inputs, the autograd engine's start per backward, and for a split backward (ZB-H1's I and W)
the walk of the autograd graph and one engine start per weight group. It also has no figure
for the optimizer step that ends every training step.

So, once the program exists, it runs for a few steps in this process on the in-process
transport (the ranks take turns, so each action is timed alone, through the same executor
``run.py`` uses), and the median of every stage's F, B, I and W and of every rank's optimizer
step become the costs the simulator predicts with. Times are scaled by the compute slowdown
the profile measured for K busy ranks, as node times are.

Where the K ranks will share this machine's cores (a CPU profile with concurrency above one),
one slowdown for every stage is not enough: a stage that streams memory (an LM head over a
large vocabulary) slows more beside a busy neighbour than one that multiplies small matrices,
and a rank that waits frees its core for the other. So the stages are then timed as they will
run: the program runs for a few steps under torchrun on this machine, ``run.py --trace``
records every action, and each stage's F, B, I and W come from that trace: per step the mean of
its actions (a step pays for every slow action), over the steps the median. That trace also
times what the simulator prices around the pipeline, as the ranks really do it at once: how late
each rank's first action starts (the runtime posts the step's receives first), the tied
gradients' all-reduce, every rank's optimizer step, and how the actions' times scatter around
their means (which the simulator draws from: ranks that wait on each other pay for the slower).
The trace's CPU time of each stage's F and B is kept beside them, for the report: where ranks
outnumber cores, a stage's wall time also holds the time slices the other ranks took from its core.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ppcompile.errors import CompileError
from ppcompile.launch import torchrun_command
from ppcompile.program import write_atomically, write_program
from ppcompile.replay import action_jitter, measured_stage_costs, run_stage_costs, send_call_seconds
from ppcompile.runtime.heap import keep_freed_memory
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.trace import measured_trace
from ppcompile.runtime.train import InProcessPipeline, batches

WARMUP_STEPS = 1
TIMED_STEPS = 3
# Under torchrun, trace about this many seconds of steps (at least TIMED_STEPS, at most
# MAX_TRACED_STEPS): a program of millisecond stages needs many micro-batches for a stable mean,
# and one of seconds-long stages has them in a few steps. gpt_mini's 4 ranks on 2 cores: its
# stages' wall-time balance (slowest over mean) ranged 1.02-1.21 over five runs of one program
# tracing 11 steps each, and 1.06-1.08 over five tracing 59.
TRACE_SECONDS = 4.0
MAX_TRACED_STEPS = 60
CALIBRATION_VERSION = "calibration-v2, send calls timed"  # in the cache key: older entries lack fields
TORCHRUN_TIMEOUT = 600  # seconds for the traced run; a program that slow is the user's to see


def calibrate(
    program: dict,
    files: dict[str, str],
    optimizer: str,
    device: str = "cpu",
    threads: int = 1,
    slowdown: float = 1.0,
    shared_machine: bool = False,
) -> dict:
    """Per stage the median seconds of F, B, I and W, and per rank the optimizer step, measured
    by running ``program`` in-process; the dict ``program.json`` keeps as ``costs.calibrated``.

    Example::

        result = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=2))
        calibrate(result.program, result.files, "adamw")["stages"][0]["forward_seconds"]

    With ``shared_machine``, the stages' times come from a run of the program under torchrun
    on this machine instead (see the module's docstring).
    """
    if torch.device(device).type == "cpu":  # run.py's heap on CPU
        keep_freed_memory()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="ppcompile-calibrate-") as tmp:
            loaded = load_program(write_program(Path(tmp) / "program", program, files))
            pipeline = InProcessPipeline(loaded, optimizer=optimizer, device=device)
            data = batches(loaded, pipeline.spec, seed=0)
            steps, updates, step_seconds = [], [[] for _ in pipeline.optimizers], []
            cpu = {}
            for step in range(WARMUP_STEPS + TIMED_STEPS):
                microbatches = [{k: v.to(device) for k, v in mb.items()} for mb in next(data)]
                trace = [] if step >= WARMUP_STEPS else None
                start = time.perf_counter()
                if loaded.trains:
                    pipeline.step(microbatches, update=False, trace=trace)
                else:  # compiled for inference: forward only, and no optimizer step to time
                    pipeline.evaluate(microbatches, trace=trace)
                step_seconds.append(time.perf_counter() - start)
                for rank, opt in enumerate(pipeline.optimizers if loaded.trains else ()):
                    start = time.perf_counter()
                    opt.step()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize(device)
                    if trace is not None:
                        updates[rank].append(time.perf_counter() - start)
                if trace is not None:
                    steps.extend(trace)
            named = pipeline.named_parameters()
            tied_bytes = [named[group["parameters"][0]].nbytes for group in loaded.data["tied_parameters"]]
            if shared_machine:
                # The ranks took turns here; under torchrun they overlap, about K at a time.
                pipelined = statistics.median(step_seconds) / loaded.num_ranks
                traced = min(
                    MAX_TRACED_STEPS, max(TIMED_STEPS, math.ceil(TRACE_SECONDS / max(pipelined, 1e-6)))
                )
                costs, around = traced_stage_costs(loaded.root, loaded.num_ranks, optimizer, traced)
                stage_scale, timed_as = 1.0, f"under torchrun, {loaded.num_ranks} ranks at once"
                # An inference program's run takes no optimizer step.
                update_seconds = around["update_seconds"] or [0.0] * loaded.num_ranks
                cpu = around["cpu"]
            else:
                costs, around = measured_stage_costs(measured_trace(steps)), {}
                stage_scale, timed_as = slowdown, "in this process, scaled by the profile's slowdown"
                update_seconds = [statistics.median(u) * slowdown if u else 0.0 for u in updates]
    finally:
        torch.set_num_threads(previous_threads)

    def scaled(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * stage_scale

    return {
        "slowdown": slowdown,
        "stages_timed": timed_as,
        "stages": [
            {
                "stage": stage,
                "forward_seconds": scaled(c.forward),
                "backward_seconds": scaled(c.backward),
                "backward_input_seconds": scaled(c.backward_input),
                "backward_weight_seconds": scaled(c.backward_weight),
                # Under torchrun only: the CPU time of the rank's thread in the stage's F and in
                # its B (I + W where split), its own work without the time slices other ranks
                # sharing its core took meanwhile.
                "forward_cpu_seconds": cpu[stage].forward if cpu else None,
                "backward_cpu_seconds": cpu[stage].backward if cpu else None,
            }
            for stage, c in sorted(costs.items())
        ],
        "update_seconds": update_seconds,
        # Bytes of each tied group's gradient, all-reduced between its ranks before the update.
        "tied_bytes": tied_bytes,
        # Timed under torchrun only (None in this process, where the ranks take turns): per rank,
        # how long after the step's start its first action began, and the tied all-reduce.
        "start_seconds": around.get("start_seconds"),
        "reduce_seconds": around.get("reduce_seconds"),
        # How the actions' times scattered around their means (replay.action_jitter): the
        # simulator draws from it, as ranks that wait on each other pay for the slower one.
        "jitter": around.get("jitter"),
        # Timed under torchrun only: one send call's seconds on its rank, as the runtime makes it
        # beside the other ranks' work; it replaces the profile's probe of the link.
        "send_seconds": around.get("send_seconds"),
    }


def traced_stage_costs(
    program_dir: Path, ranks: int, optimizer: str, traced_steps: int = TIMED_STEPS
) -> tuple[dict, dict]:
    """Per stage, F, B, I and W from ``traced_steps`` steps of ``run.py --trace`` under torchrun,
    after a warm-up step (:func:`run_stage_costs`); and what the steps cost around the pipeline,
    as the trace's ``otherData`` states it: ``start_seconds``, ``reduce_seconds`` and
    ``update_seconds`` (see :func:`ppcompile.runtime.trace.measured_trace`), the actions'
    ``jitter`` (:func:`ppcompile.replay.action_jitter`), and as ``cpu`` the stages' F, B, I and W
    in their ranks' CPU time."""
    trace = Path(program_dir) / "calibration-trace.json"
    steps = WARMUP_STEPS + traced_steps
    command = torchrun_command(
        Path(program_dir) / "run.py", ranks, "--steps", steps, "--optimizer", optimizer, "--lr", 0.0
    )
    command += ["--trace", str(trace), "--trace-steps", str(traced_steps)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CompileError(
            f"--profile: timing the stages under torchrun took over {TORCHRUN_TIMEOUT} s; "
            "use --profile-concurrency 1 to time them in this process"
        ) from None
    if run.returncode != 0 or not trace.is_file():
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        raise CompileError(
            f"--profile: timing the stages under torchrun failed ({lines[-1] if lines else run.returncode}); "
            "use --profile-concurrency 1 to time them in this process"
        )
    document = json.loads(trace.read_text())
    other = document["otherData"]
    around = {key: other[key] for key in ("start_seconds", "reduce_seconds", "update_seconds")}
    around["jitter"] = action_jitter(document)
    around["send_seconds"] = send_call_seconds(document)
    around["cpu"] = run_stage_costs(document, clock="cpu")
    return run_stage_costs(document), around


def cached_calibration(
    cache_dir: str | None, profile_key: str, program: dict, files: dict[str, str], **options
) -> dict:
    """:func:`calibrate`, kept in ``cache_dir`` (None: always measure) under the profile's key and
    everything that decides the stages' work: their code, the schedule, the optimizer."""
    what = [
        CALIBRATION_VERSION,
        profile_key,
        json.dumps(sorted(files.items())),
        json.dumps(program["schedule"]),
        json.dumps(options),
    ]
    key = hashlib.sha256("\n".join(what).encode()).hexdigest()[:24]
    cache_file = None if cache_dir is None else Path(cache_dir).expanduser() / f"calibration-{key}.json"
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if len(cached["stages"]) == len(program["costs"]["stages"]):
                return cached
        except (ValueError, TypeError, KeyError):
            pass  # cut short or from another version: calibrate again and overwrite it
    calibrated = calibrate(program, files, **options)
    if cache_file is not None:
        write_atomically(cache_file, json.dumps(calibrated, indent=0))
    return calibrated


def calibration_note(program: dict) -> str:
    """One line for the report: whole stages against their node sums, and the optimizer step."""
    calibrated = program["costs"]["calibrated"]
    parts, split = [], []
    for whole, summed in zip(calibrated["stages"], program["costs"]["stages"]):
        parts.append(
            f"stage {whole['stage']} {(whole['forward_seconds'] + whole['backward_seconds']) * 1e3:.2f} ms "
            f"(node sum {summed['compute_seconds'] * 1e3:.2f})"
        )
        if whole["backward_input_seconds"] is not None:
            split.append((whole["backward_seconds"], summed["backward_seconds"]))
    if split:
        parts.append(
            "split backward I+W over the node sum's B " + ", ".join(f"{w / b:.2f}" for w, b in split)
        )
    if calibrated["stages"][0].get("forward_cpu_seconds") is not None:
        cpu = ", ".join(
            f"{(s['forward_cpu_seconds'] + s['backward_cpu_seconds']) * 1e3:.2f}"
            for s in calibrated["stages"]
        )
        parts.append(f"the ranks' CPU time in them {cpu} ms")
    trains = program.get("trains", True)
    if trains:
        update = ", ".join(f"{u * 1e3:.2f}" for u in calibrated["update_seconds"])
        parts.append(f"optimizer step per rank {update} ms")
    if calibrated.get("start_seconds"):
        begun = ", ".join(f"{s * 1e3:.2f}" for s in calibrated["start_seconds"])
        parts.append(f"first action per rank {begun} ms into the step")
    if calibrated.get("send_seconds") is not None:
        parts.append(f"a send call {calibrated['send_seconds'] * 1e6:.0f} us")
    if calibrated.get("reduce_seconds") is not None:
        parts.append(f"tied all-reduce {calibrated['reduce_seconds'] * 1e3:.2f} ms")
    jitter = calibrated.get("jitter")
    if jitter:
        tenth, ninetieth = jitter[len(jitter) // 10], jitter[-1 - len(jitter) // 10]
        parts.append(f"actions took {tenth:.2f}-{ninetieth:.2f}x their mean (10th-90th percentile)")
    timed_as = calibrated.get("stages_timed", "in this process")
    timed = "F+B" if trains else "F (inference)"
    return (
        f"calibrated: stages timed whole in the runtime ({timed_as}), {timed} per micro-batch: "
        + "; ".join(parts)
    )
