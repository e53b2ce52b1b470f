"""Schedules measured against the simulator: gpt_mini on K ranks of this machine.

For each schedule: compile with measured node costs (--profile, measured afresh; on a CPU it
also measures what two busy ranks cost each other, and it times the compiled stages whole),
predict one step with the simulator, then train under torchrun (gloo) and take the median step
time and, from the runtime's --trace, the measured bubble. Goal: measured within 15% of
predicted. This machine's speed drifts by more than that over a minute, so the whole is done
``--rounds`` times, each schedule profiled just before its run, and the ratios are the medians.

A second prediction replays the same schedule with the stage times the run itself measured, each
rank starting its first action as late as it did in the run and the actions scattering as they
did there (``ppcompile simulate DIR --costs-from trace.json``): measured over that isolates what the simulator's schedule and link
model miss from what the profiled stage costs miss.

    python bench/schedules.py                         # K=2, M=8, gpt_mini, 3 rounds
    python bench/schedules.py --stages 2 --microbatches 4 --steps 9 --rounds 1    # quicker
    python bench/schedules.py --quick                 # the test suite's smoke run

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
from ppcompile.replay import action_jitter, run_stage_costs, simulate_program  # noqa: E402

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2)]


def main() -> int:
    parser = argparse.ArgumentParser(description="measured vs predicted step time per schedule")
    parser.add_argument("--model", default="models/gpt.py:gpt_mini")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="compile (profiling afresh) and run every schedule this many times; ratios are the medians",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 4 micro-batches, 3 steps, one round"
    )
    args = parser.parse_args()
    if args.quick:
        args.microbatches, args.steps, args.rounds = 4, 3, 1

    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, V in SCHEDULES:
                label = name if V == 1 else f"{name} V={V}"
                measured = measure(args, name, V, Path(tmp) / f"round{r}")
                if measured is None:
                    return 1
                rounds.setdefault(label, []).append(measured)
                print(
                    f"round {r + 1}/{args.rounds} {label}: measured/predicted "
                    f"{measured['measured'] / measured['predicted']:.3f}",
                    flush=True,
                )
    rows, ratios = [], []
    for label, found in rounds.items():
        median = {key: statistics.median(m[key] for m in found) for key in found[0]}
        measured_over_predicted = statistics.median(m["measured"] / m["predicted"] for m in found)
        traced_over_replayed = statistics.median(m["traced"] / m["replayed"] for m in found)
        ratios.append((label, measured_over_predicted, traced_over_replayed))
        rows.append(
            [
                label,
                f"{median['predicted'] * 1e3:.2f}",
                f"{median['measured'] * 1e3:.2f}",
                f"{measured_over_predicted:.3f}",
                " ".join(f"{m['measured'] / m['predicted']:.2f}" for m in found),
                f"{median['predicted_bubble']:.3f}",
                f"{median['measured_bubble']:.3f}",
                f"{median['replayed'] * 1e3:.2f}",
                f"{median['traced'] * 1e3:.2f}",
                f"{traced_over_replayed:.3f}",
            ]
        )
    headers = [
        "schedule",
        "predicted ms",
        "measured ms",
        "measured/predicted",
        "per round",
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
        + f" (median of {args.rounds} rounds; goal within 0.85..1.15)"
    )
    return 0


def measure(args, name: str, V: int, tmp: Path) -> dict | None:
    """Compile one schedule with costs profiled now, predict its step, run it under torchrun."""
    config = CompileConfig(
        stages=args.stages,
        microbatches=args.microbatches,
        schedule=name,
        virtual_stages=V,
        profile=True,
        profile_cache=None,  # measured afresh: a cached profile may come from a busier or quieter machine
    )
    result = compile_model(args.model, config)
    out = write_program(tmp / f"{name}_{V}", result.program, result.files)
    trace, record = tmp / f"{name}_{V}.json", tmp / f"{name}_{V}_record"
    command = torchrun_command(
        out / "run.py", args.stages, "--steps", args.steps, "--trace", trace, "--trace-steps", 3
    )
    command += ["--record", record]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        print(run.stderr[-2000:], file=sys.stderr)
        return None
    _, times = recorded_run(record)
    document = json.loads(trace.read_text())
    traced = document["otherData"]
    replayed = simulate_program(
        result.program,
        costs=run_stage_costs(document),
        start_seconds=traced["start_seconds"],
        jitter=action_jitter(document),
    )
    return {
        "predicted": result.program["costs"]["simulated_step_seconds"],
        # The first third is warm-up: the allocator, gloo's first messages.
        "measured": statistics.median(times[len(times) // 3 :]),
        "predicted_bubble": result.program["costs"]["simulated_bubble"],
        "measured_bubble": traced["measured_bubble"],
        # The replay takes each stage's median over the traced steps: set it beside their median.
        "traced": statistics.median(traced["step_seconds"]),
        "replayed": replayed.step_time,
    }


if __name__ == "__main__":
    sys.exit(main())
