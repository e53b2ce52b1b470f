"""The benchmarks against torch.distributed.pipelining and the simulator still run end to end
(toy sizes, --quick).

Only the exit code and the shape of the last line are checked: timings on a shared CPU are noise.
A non-zero exit also means a system's losses differed from the eager model's.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "bench", ["vs_pippy.py", "overhead.py", "schedules.py", "sends.py", "inference.py", "microbatches.py"]
)
def test_bench_runs_quick(bench):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / bench), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ratios:"), result.stdout[-2000:]
