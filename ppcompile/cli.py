"""The ``ppcompile`` command line. Errors a user can cause end in one line and exit code 2."""

from __future__ import annotations

import sys
from functools import wraps
from pathlib import Path

import click

from ppcompile.context import CompileConfig
from ppcompile.errors import CompileError
from ppcompile.passes.fuse_loss import NOTHING_FUSED
from ppcompile.passes.propagate_shapes import SAMPLES_RELATED
from ppcompile.runtime.loader import ProgramError
from ppcompile.runtime.train import OPTIMIZERS


def user_errors(fn):
    """Turn a CompileError, or a ProgramError (a program or its model's data the runtime refuses),
    into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CompileError, ProgramError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="ppcompile")
def main():
    """ppcompile: compile a PyTorch model into a pipeline-parallel program."""


@main.command()
@click.argument("spec")
@click.option("--stages", "-k", type=int, required=True, help="Pipeline stages K (one per rank).")
@click.option(
    "--microbatches",
    "-m",
    default="8",
    show_default=True,
    help="Micro-batches M per step, or auto (with --global-batch): the split with the shortest predicted step that fits.",
)
@click.option(
    "--global-batch",
    type=int,
    help="Rows per optimizer step, split into M micro-batches of N/M rows (the example's b otherwise).",
)
@click.option(
    "--schedule",
    default="1f1b",
    show_default=True,
    help="Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zb-h1, forward-only (inference), or auto (fastest that fits).",
)
@click.option(
    "--virtual-stages", "-v", type=int, default=1, show_default=True, help="Stages per rank (interleaved)."
)
@click.option("--device-profile", default="cpu", show_default=True, help="Cost profile: cpu, a100 or h100.")
@click.option("--memory-per-device", help="Memory budget per rank, e.g. 16GiB; layers are recomputed to fit.")
@click.option(
    "--optimizer",
    default="adamw",
    show_default=True,
    help=f"Optimizer whose state the memory model counts: {', '.join(OPTIMIZERS)}.",
)
@click.option(
    "--profile", is_flag=True, help="Measure every node's time on a real device instead of the roofline."
)
@click.option(
    "--profile-device",
    default="cpu",
    show_default=True,
    help="Device --profile measures on: cpu, cuda, cuda:N.",
)
@click.option(
    "--profile-threads",
    default=1,
    show_default=True,
    help="CPU threads while profiling (torchrun gives ranks 1).",
)
@click.option(
    "--profile-concurrency",
    type=int,
    help="Processes kept busy while profiling [default: one per rank on cpu, 1 on cuda].",
)
@click.option(
    "--profile-cache",
    default="~/.cache/ppcompile/profiles",
    show_default=True,
    help="Where measured profiles are kept, by graph and device; 'none' (or '') to always measure.",
)
@click.option("--dims", help="Balance for another micro-batch shape, e.g. b=8,s=512, from the cost formulas.")
@click.option(
    "--fuse-loss",
    is_flag=True,
    help="Compute the last linear layer and its cross-entropy in blocks of rows, without the logits tensor "
    "(faster, less memory; losses then match eager to float rounding, not bitwise).",
)
@click.option(
    "--spare-cores",
    is_flag=True,
    help="With --profile on a CPU whose cores the ranks share: run the long actions that the other ranks "
    "wait through (the pipeline's bubbles) on every core.",
)
@click.option(
    "--divide-layers/--whole-layers",
    default=True,
    show_default=True,
    help="Let a cut fall inside a linear layer, each side computing a band of its output features, where "
    "that evens the stages; --whole-layers keeps every layer on one stage.",
)
@click.option("--check", is_flag=True, help="Run the verifier after every pass.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Program directory to write.")
@user_errors
def compile(
    spec,
    stages,
    microbatches,
    global_batch,
    schedule,
    virtual_stages,
    device_profile,
    memory_per_device,
    optimizer,
    profile,
    profile_device,
    profile_threads,
    profile_concurrency,
    profile_cache,
    dims,
    fuse_loss,
    spare_cores,
    divide_layers,
    check,
    output,
):
    """Compile SPEC (PATH.py:FACTORY) into a program directory."""
    from ppcompile.driver import compile_model
    from ppcompile.memory import parse_bytes
    from ppcompile.program import write_program

    config = CompileConfig(
        stages=stages,
        microbatches=_parse_microbatches(microbatches),
        global_batch=global_batch,
        schedule=schedule,
        virtual_stages=virtual_stages,
        device_profile=device_profile,
        check=check,
        memory_per_device=parse_bytes(memory_per_device) if memory_per_device is not None else None,
        optimizer=optimizer,
        profile=profile,
        profile_device=profile_device,
        profile_threads=profile_threads,
        profile_concurrency=profile_concurrency,
        # An empty path would mean this directory; like 'none', it keeps nothing.
        profile_cache=None if profile_cache.strip().lower() in ("", "none") else profile_cache,
        dims=_parse_dims(dims) if dims else None,
        fuse_loss=fuse_loss,
        spare_cores=spare_cores,
        divide_layers=divide_layers,
    )
    result = compile_model(spec, config)
    out = write_program(output, result.program, result.files)
    times = [s["seconds"] for s in result.program["costs"]["stages"]]
    click.echo(
        f"wrote {out}/ ({len(times)} stages on {stages} ranks, schedule {result.program['schedule']['name']}, imbalance {max(times) / (sum(times) / len(times)):.3f}); "
        f"see `ppcompile report {output}`"
    )
    for note in result.ctx.notes:
        if note.startswith((NOTHING_FUSED, SAMPLES_RELATED)):
            click.echo(f"warning: {note}", err=True)


def _parse_microbatches(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().lstrip("-").isdigit():
        raise CompileError(f"--microbatches {text!r}: give a count such as 8, or auto with --global-batch N")
    return int(text)


def _parse_dims(text: str) -> dict[str, int]:
    dims = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip().isidentifier() or not value.strip().isdigit() or int(value) < 1:
            raise CompileError(f"--dims {text!r}: write symbol=size pairs such as b=8,s=512")
        dims[name.strip()] = int(value)
    return dims


@main.command()
@click.argument("program_dir", type=click.Path())
@user_errors
def report(program_dir):
    """Print the partition report of a compiled program."""
    from ppcompile.program import read_program
    from ppcompile.report import render_report

    click.echo(render_report(read_program(program_dir)), nl=False)


@main.command()
@click.argument("program_dir", type=click.Path())
@click.option("--png", type=click.Path(), help="Draw the predicted timeline of one step (needs matplotlib).")
@click.option(
    "--trace", type=click.Path(), help="Write the predicted timeline as Chrome trace JSON (Perfetto)."
)
@click.option("--infer", is_flag=True, help="Simulate the forward-only inference schedule instead.")
@click.option(
    "--costs-from",
    type=click.Path(),
    help="Use the stage times of a measured run (run.py --trace file) instead of the compiler's.",
)
@user_errors
def simulate(program_dir, png, trace, infer, costs_from):
    """Predict one step of a compiled program: time, bubble, activations in flight, per rank.

    With --costs-from, each stage's F/B/I/W take the mean time they took in that measured run
    (a step pays for every slow action), each rank begins as late as it did there and the
    actions scatter as they did there: the step the schedule would give with the costs the run
    really had (both ranks busy).
    """
    import json

    from ppcompile.replay import simulate_program
    from ppcompile.schedules import ScheduleError
    from ppcompile.timeline import chrome_trace, render_png

    program = _load(program_dir).data
    key = "inference_schedule" if infer else "schedule"
    costs = start_seconds = jitter = None
    if costs_from:
        costs, start_seconds, jitter = _measured_costs(costs_from, program)
    result = simulate_program(program, key, costs, start_seconds, jitter)
    name = program[key]["name"]
    K, M = len(result.busy_time), program[key]["microbatches"]
    click.echo(f"{name}: {len(program['stages'])} stages on {K} ranks, {M} micro-batches")
    if costs_from:
        basis = f"stage times measured in {costs_from}"
    elif key == "schedule" and "calibrated" in program["costs"]:
        basis = "the stages timed whole by --profile; the step ends with the optimizer update"
    else:
        basis = "the compiler's stage costs"
    click.echo(
        f"predicted step {result.step_time * 1e3:.2f} ms, bubble {float(result.overall_bubble_fraction):.3f} "
        f"(from {basis})"
    )
    memory = program["costs"].get("memory") or []
    for rank in range(K):
        stages = [s["id"] for s in program["stages"] if s["rank"] == rank]
        peak = sum(memory[s]["total"] for s in stages) if memory else 0.0
        click.echo(
            f"  rank {rank}: busy {result.busy_time[rank] * 1e3:.2f} ms, idle {float(result.bubble_fraction[rank]):.1%}, "
            f"at most {result.peak_live_per_rank[rank]} micro-batches of activations, peak memory {peak / 2**20:.1f} MiB"
        )
    if trace:
        metadata = {"predicted_step_seconds": float(result.step_time), "schedule": name}
        with open(trace, "w") as f:
            json.dump(chrome_trace(result.events, metadata=metadata), f)
        click.echo(f"wrote {trace} (open in https://ui.perfetto.dev)")
    if png:
        try:
            render_png(result, png, title=f"{program['model']['factory']}: {name}, K={K}, M={M}")
        except ScheduleError as e:
            raise CompileError(str(e)) from None
        click.echo(f"wrote {png}")


def _measured_costs(path: str, program: dict):
    """Per-stage costs from a run.py --trace file, how late each rank began its first action there
    and how its actions scattered; a file that is not one is a user error."""
    import json

    from ppcompile.replay import action_jitter, run_stage_costs

    try:
        document = json.loads(Path(path).read_text())
        costs = run_stage_costs(document)
    except OSError as e:
        raise CompileError(f"--costs-from {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise CompileError(
            f"--costs-from {path} is not a trace written by run.py --trace; record one with "
            "torchrun ... run.py --trace FILE"
        ) from None
    stages = {s["id"] for s in program["stages"]}
    if set(costs) != stages:
        raise CompileError(
            f"--costs-from {path} times stages {sorted(costs)} but this program has stages {sorted(stages)}; "
            "trace a run of this program"
        )
    # Traces from before the runtime recorded when each rank began its step start every rank at 0.
    return costs, document.get("otherData", {}).get("start_seconds"), action_jitter(document)


@main.command()
@click.argument("program_dir", type=click.Path())
@click.option("--steps", default=3, show_default=True, help="Optimizer steps to compare.")
@click.option(
    "--optimizer",
    type=click.Choice(list(OPTIMIZERS)),
    help="[default: the one the program was compiled for, as run.py trains with]",
)
@click.option("--lr", default=1e-2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--rtol",
    type=float,
    default=None,
    help="Relative tolerance for gradients and parameters [default: 1e-5; two epsilons of a model's "
    "lower precision, bfloat16 or float16, where its parameters have one].",
)
@click.option(
    "--device", default="cpu", show_default=True, help="Where both train: cpu, cuda or cuda:N (every rank)."
)
@user_errors
def verify(program_dir, steps, optimizer, lr, seed, rtol, device):
    """Train PROGRAM_DIR in one process beside the eager model (or, compiled for inference, compare
    its outputs with the eager forward's); exit 0 only if they agree."""
    from ppcompile.check_training import verify_in_process, verify_inference_in_process
    from ppcompile.devices import check_device

    program = _load(program_dir)
    device = str(check_device(device, "--device"))
    if program.trains:
        chosen = optimizer or program.optimizer
        compiled_for = " (the optimizer compiled for)" if optimizer is None else ""
        click.echo(f"{steps} steps with {chosen}{compiled_for}, lr {lr:g}, beside the eager model")
        result = verify_in_process(
            program, steps=steps, optimizer=chosen, lr=lr, seed=seed, rtol=rtol, device=device
        )
    else:  # compiled for inference: its outputs against the eager forward's
        result = verify_inference_in_process(program, steps=steps, seed=seed, rtol=rtol, device=device)
    for line in result.lines():
        click.echo(line)
    click.echo(result.verdict())
    sys.exit(0 if result.ok else 1)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("program_dir", type=click.Path())
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def run(program_dir, run_args):
    """Start torchrun with one process per rank: ppcompile run DIR -- --steps 50."""
    import subprocess
    from pathlib import Path

    from ppcompile.launch import torchrun_command

    program = _load(program_dir)
    command = torchrun_command(Path(program_dir) / "run.py", program.num_ranks, *run_args)
    click.echo("torchrun " + " ".join(command[3:]), err=True)
    sys.exit(subprocess.call(command))


def _load(program_dir):
    from ppcompile.runtime.loader import load_program

    return load_program(program_dir)


if __name__ == "__main__":
    main()
