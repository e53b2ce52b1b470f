"""Shared test helpers: compile into a temporary directory and chain the stages in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from ppcompile.context import CompileConfig
from ppcompile.driver import compile_model
from ppcompile.launch import torchrun_command as launch_command
from ppcompile.program import write_program
from ppcompile.runtime.executor import size_arguments, stage_arguments, symbol_values
from ppcompile.runtime.loader import Program, load_program
from ppcompile.runtime.spec import ModelRef
from ppcompile.runtime.train import InProcessPipeline, batches


def compile_to(tmp: Path, ref: str, stages: int, **options) -> Path:
    config = CompileConfig(stages=stages, check=True, **options)
    result = compile_model(ref, config)
    return write_program(tmp / f"prog_{stages}", result.program, result.files)


def chained_forward(program_dir: Path, model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """Run every stage's forward in order, handing boundary tensors from producer to consumer."""
    program = load_program(program_dir)
    by_name = dict(zip([i["name"] for i in program.data["inputs"]], inputs))
    symbols = symbol_values(program, by_name)
    values = {}
    loss = None
    for stage_id in range(program.num_stages):
        info = program.stage(stage_id)
        stage = program.stage_class(stage_id)(model)
        args = stage_arguments(info, by_name, values, size_arguments(info, symbols))
        out = stage(*args)
        for name in info["sends"]:
            values[name] = out[name]
        if info["returns_loss"]:
            loss = out["loss"]
    return loss


def build_model(ref: str, seed: int = 0):
    spec = ModelRef.parse(ref).build("cpu", seed=seed)
    return spec.module, spec.example_inputs


def tracked_step(program_dir: Path) -> tuple[Program, InProcessPipeline]:
    """One in-process training step of the program with activation counting on."""
    program = load_program(program_dir)
    pipeline = InProcessPipeline(program, track_memory=True)
    pipeline.step(next(batches(program, pipeline.spec, 0)))
    return program, pipeline


def torchrun_command(program_dir: Path, nproc: int, *args: str) -> list[str]:
    """torchrun of a compiled program's ``run.py`` with ``args``."""
    return launch_command(program_dir / "run.py", nproc, *args)


def ppcompile(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run the ``ppcompile`` command line as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "ppcompile", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: exit code 2 and one line on stderr that holds every needle."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def compare_record(program_dir: Path, record: Path, ranks: int, steps: int = 3, lr: float = 0.05):
    """A torchrun run's ``--record`` (sgd at ``lr``) against the eager model's same steps, buffers
    (a BatchNorm's running statistics) included."""
    from ppcompile.check_training import compare, eager_training

    saved = [torch.load(record / f"rank{r}.pt") for r in range(ranks)]
    losses = next(r["losses"] for r in saved if r["losses"])
    # The rank that prints the losses keeps each step's time beside them, unrounded.
    times = next(r["step_seconds"] for r in saved if r["losses"])
    assert len(times) == len(losses) == steps and all(t > 0 for t in times), times
    grads = {n: g for r in saved for n, g in r["grads"].items()}
    params = {n: p for r in saved for n, p in r["params"].items()}
    buffers: dict[str, dict[int, torch.Tensor]] = {}
    for rank, r in enumerate(saved):
        for name, buffer in r["buffers"].items():
            buffers.setdefault(name, {})[rank] = buffer
    # One thread, as torchrun gives each rank: a gradient BatchNorm cancels (a conv bias before it)
    # is rounding noise whose value depends on the summation order, and the thread count sets it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager = eager_training(load_program(program_dir), steps, "sgd", lr, 0)
    finally:
        torch.set_num_threads(threads)
    reference = (eager.losses, eager.gradients, eager.parameters)
    comparison = compare(
        losses,
        grads,
        params,
        reference,
        rtol=1e-5,
        buffers=buffers,
        reference_buffers=eager.buffers,
        initial_parameters=eager.initial_parameters,
    )
    return losses, reference, comparison
