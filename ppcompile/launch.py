"""The torchrun command line, in one place: ``ppcompile run``, the benchmarks and the tests use it."""

from __future__ import annotations

import sys
from pathlib import Path


def torchrun_command(script: str | Path, nproc: int, *args: str) -> list[str]:
    """``torchrun --standalone --nproc-per-node N SCRIPT ARGS`` with this interpreter.

    >>> torchrun_command("build/mini/run.py", 2, "--steps", "5")[3:]
    ['--standalone', '--nproc-per-node', '2', 'build/mini/run.py', '--steps', '5']
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [*launcher, str(script), *map(str, args)]
