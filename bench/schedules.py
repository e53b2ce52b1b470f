"""Schedules measured against the simulator: gpt_mini on K ranks of this machine.

For each schedule: compile with measured node costs (--profile, measured afresh; on a CPU it
also measures what two busy ranks cost each other, and it times the compiled stages whole),
predict one step with the simulator, then train under torchrun (gloo) and take the median step
time and, from the runtime's --trace, the measured bubble. Goal: measured within 15% of
predicted.

A second prediction replays the same schedule with the stage times the run itself measured, each
rank starting its first action as late as it did in the run (``ppcompile simulate DIR
--costs-from trace.json``): measured over that isolates what the simulator's schedule and link
model miss from what the profiled stage costs miss.

    python bench/schedules.py                         # K=2, M=8, gpt_mini
    python bench/schedules.py --stages 2 --microbatches 4 --steps 9    # quicker

The last line prints measured/predicted per schedule.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _gpt_bench import recorded_run  # noqa: E402 - bench/ is on the path when run as a script
from tabulate import tabulate  # noqa: E402

from ppcompile.context import CompileConfig  # noqa: E402
from ppcompile.driver import compile_model  # noqa: E402
from ppcompile.launch import torchrun_command  # noqa: E402
from ppcompile.program import write_program  # noqa: E402
from ppcompile.replay import run_stage_costs, simulate_program  # noqa: E402

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2)]


def main() -> int:
    parser = argparse.ArgumentParser(description="measured vs predicted step time per schedule")
    parser.add_argument("--model", default="models/gpt.py:gpt_mini")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, V in SCHEDULES:
            config = CompileConfig(
                stages=args.stages,
                microbatches=args.microbatches,
                schedule=name,
                virtual_stages=V,
                profile=True,
                profile_cache=None,  # measured afresh: a cached profile may come from a busier or quieter machine
            )
            result = compile_model(args.model, config)
            out = write_program(Path(tmp) / f"{name}_{V}", result.program, result.files)
            predicted = result.program["costs"]["simulated_step_seconds"]
            predicted_bubble = result.program["costs"]["simulated_bubble"]
            trace = Path(tmp) / f"{name}_{V}.json"
            record = Path(tmp) / f"{name}_{V}_record"
            command = torchrun_command(
                out / "run.py", args.stages, "--steps", args.steps, "--trace", trace, "--trace-steps", 3
            )
            command += ["--record", record]
            run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                print(run.stderr[-2000:], file=sys.stderr)
                return 1
            _, times = recorded_run(record)
            # The first third is warm-up: the allocator, gloo's first messages.
            measured = statistics.median(times[len(times) // 3 :])
            document = json.loads(trace.read_text())
            traced = document["otherData"]
            measured_bubble = traced["measured_bubble"]
            # The replay takes each stage's median over the traced steps: set it beside their median.
            step = statistics.median(traced["step_seconds"])
            costs = run_stage_costs(document)
            replayed = simulate_program(
                result.program, costs=costs, start_seconds=traced["start_seconds"]
            ).step_time
            label = name if V == 1 else f"{name} V={V}"
            ratios.append((label, measured / predicted, step / replayed))
            rows.append(
                [
                    name,
                    V,
                    f"{predicted * 1e3:.2f}",
                    f"{measured * 1e3:.2f}",
                    f"{measured / predicted:.3f}",
                    f"{predicted_bubble:.3f}",
                    f"{measured_bubble:.3f}",
                    f"{replayed * 1e3:.2f}",
                    f"{step * 1e3:.2f}",
                    f"{step / replayed:.3f}",
                ]
            )
    headers = [
        "schedule",
        "V",
        "predicted ms",
        "measured ms",
        "measured/predicted",
        "predicted bubble",
        "measured bubble",
        "replayed ms (run's stage times)",
        "traced ms",
        "traced/replayed",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(
        "schedule model alone: traced/replayed "
        + ", ".join(f"{n} {r:.3f}" for n, _, r in ratios)
        + " (the traced steps' pipeline time over the replay of their own stage times)"
    )
    print(
        "ratios: measured/predicted "
        + ", ".join(f"{n} {r:.3f}" for n, r, _ in ratios)
        + " (goal within 0.85..1.15)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
