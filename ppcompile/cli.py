"""The ``ppcompile`` command line. Errors a user can cause end in one line and exit code 2."""

from __future__ import annotations

import sys
from functools import wraps

import click

from ppcompile.context import CompileConfig
from ppcompile.errors import CompileError


def user_errors(fn):
    """Turn a CompileError into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompileError as e:
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
@click.option("--microbatches", "-m", type=int, default=8, show_default=True, help="Micro-batches per step.")
@click.option("--schedule", default="1f1b", show_default=True, help="Pipeline schedule: gpipe or 1f1b.")
@click.option("--device-profile", default="cpu", show_default=True, help="Cost profile: cpu, a100 or h100.")
@click.option("--check", is_flag=True, help="Run the verifier after every pass.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Program directory to write.")
@user_errors
def compile(spec, stages, microbatches, schedule, device_profile, check, output):
    """Compile SPEC (PATH.py:FACTORY) into a program directory."""
    from ppcompile.driver import compile_model
    from ppcompile.program import write_program

    config = CompileConfig(
        stages=stages,
        microbatches=microbatches,
        schedule=schedule,
        device_profile=device_profile,
        check=check,
    )
    result = compile_model(spec, config)
    out = write_program(output, result.program, result.files)
    times = [s["seconds"] for s in result.program["costs"]["stages"]]
    click.echo(
        f"wrote {out}/ ({stages} stages, imbalance {max(times) / (sum(times) / len(times)):.3f}); "
        f"see `ppcompile report {output}`"
    )


@main.command()
@click.argument("program_dir", type=click.Path())
@user_errors
def report(program_dir):
    """Print the partition report of a compiled program."""
    from ppcompile.program import read_program
    from ppcompile.report import render_report

    click.echo(render_report(read_program(program_dir)), nl=False)


if __name__ == "__main__":
    main()
