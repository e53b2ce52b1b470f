"""Benchmarks still run (toy size); their figures are never asserted: timings here are noise."""

import subprocess
import sys


def test_compile_time_bench_runs_at_toy_size():
    result = subprocess.run(
        [
            sys.executable,
            "bench/compile_time.py",
            "--model",
            "models/gpt.py:gpt_mini",
            "--stages",
            "2",
            "--microbatches",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("ratios:")
