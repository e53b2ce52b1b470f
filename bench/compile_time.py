"""Compile time and memory: GPT-3 175B into 16 stages on the meta device (nothing allocated).

Goal on a 2-core machine: under 30 s and under 4 GB peak memory, with the memory model and the
choice of recomputed layers switched on (a 200 GiB budget per rank). Prints the figures
whether or not the goal is met; the last line is the ratios against the goal.

    python bench/compile_time.py                       # gpt3_175b, 16 stages
    python bench/compile_time.py --model models/gpt.py:gpt_mini --stages 2   # toy size
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppcompile.context import CompileConfig  # noqa: E402
from ppcompile.driver import compile_model  # noqa: E402
from ppcompile.memory import parse_bytes  # noqa: E402
from ppcompile.program import write_program  # noqa: E402

GOAL_SECONDS = 30.0
GOAL_BYTES = 4 * 1024**3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/gpt.py:gpt3_175b")
    parser.add_argument("--stages", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument(
        "--memory-per-device",
        default="200GiB",
        help="budget per rank (memory model and recomputation on); 'none' to switch them off",
    )
    args = parser.parse_args()

    budget = None if args.memory_per_device.lower() == "none" else parse_bytes(args.memory_per_device)
    start = time.perf_counter()
    config = CompileConfig(stages=args.stages, microbatches=args.microbatches, memory_per_device=budget)
    result = compile_model(args.model, config)
    with tempfile.TemporaryDirectory() as tmp:
        write_program(Path(tmp) / "prog", result.program, result.files)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    times = [s["seconds"] for s in result.program["costs"]["stages"]]
    nodes = len(result.ctx.partition.compute_order)
    print(
        f"model {args.model}: {nodes} compute nodes, {args.stages} stages, imbalance {max(times) / (sum(times) / len(times)):.3f}"
    )
    print(
        f"wall time {seconds:.1f} s (goal < {GOAL_SECONDS:.0f} s), peak memory {peak / 1024**3:.2f} GB (goal < 4 GB)"
    )
    memory = result.program["costs"]["memory"]
    print(
        f"memory budget {args.memory_per_device}: predicted peak {max(m['total'] for m in memory) / 2**30:.1f} GiB "
        f"on the fullest rank, {len(result.program['costs']['recomputed'])} layers recomputed"
    )
    print(f"ratios: time/goal {seconds / GOAL_SECONDS:.2f}, memory/goal {peak / GOAL_BYTES:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
