"""Splitting a global batch into micro-batches: ``--microbatches auto``'s choice against every split,
measured.

A training step takes a global batch of N rows. Split into M micro-batches of N/M rows, more
micro-batches shrink the pipeline's bubble ((K-1)/(M+K-1)) and the activations 1F1B keeps in
flight, but run every layer on fewer rows, where its fixed costs (weights read, per-operator
dispatch, one message per micro-batch and cut) weigh more. Frameworks leave M to the user; the
field's rule of thumb is 4-8 micro-batches per stage. ``--microbatches auto`` compiles every split
and keeps the shortest predicted step within the memory budget.

Each round: compile gpt_mini for K ranks with ``--profile`` (measured afresh; one profile per
micro-batch size) and ``--microbatches auto --global-batch N``, then train every split it
compiled under torchrun (gloo) and take the median step after warm-up. The ratios, medians over
the rounds: the measured step of auto's choice over the fastest split measured (1.0: it chose the
best), and over the rule of thumb's split (M = 4K).

    python bench/microbatches.py                      # gpt_mini, K=2, N=32, 3 rounds
    python bench/microbatches.py --quick              # the test suite's smoke run (roofline costs)

The last line prints the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
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

RULE_OF_THUMB = 4  # micro-batches per stage


def main() -> int:
    parser = argparse.ArgumentParser(description="--microbatches auto against every split, measured")
    parser.add_argument("--model", default="models/gpt.py:gpt_mini")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24, help="steps per split; the first third is warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--roofline", action="store_true", help="cost with the device profile instead of --profile"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 8 rows, roofline costs, 3 steps, one round"
    )
    args = parser.parse_args()
    if args.quick:
        args.global_batch, args.steps, args.rounds, args.roofline = 8, 3, 1, True
    rule = RULE_OF_THUMB * args.stages

    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            found = measure_round(args, Path(tmp))
        if found is None:
            return 1
        rounds.append(found)
        chosen, measured = found["chosen"], found["measured"]
        print(
            f"round {r + 1}/{args.rounds}: auto chose M={chosen}; measured ms "
            + ", ".join(f"M={M} {s * 1e3:.1f}" for M, s in measured.items()),
            flush=True,
        )

    splits = sorted(rounds[0]["measured"])
    rows = []
    for M in splits:
        predicted = statistics.median(found["predicted"][M] for found in rounds)
        measured = statistics.median(found["measured"][M] for found in rounds)
        chosen = sum(found["chosen"] == M for found in rounds)
        rows.append(
            [
                M,
                args.global_batch // M,
                f"{predicted * 1e3:.1f}",
                f"{measured * 1e3:.1f}",
                f"{measured / predicted:.2f}",
                f"{chosen}/{len(rounds)}" if chosen else "",
                "rule of thumb" if M == rule else "",
            ]
        )
    headers = ["M", "rows (b)", "predicted ms", "measured ms", "measured/predicted", "auto chose", ""]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))

    over_best = statistics.median(f["measured"][f["chosen"]] / min(f["measured"].values()) for f in rounds)
    line = (
        f"ratios: global batch {args.global_batch} on K={args.stages}, "
        f"{'roofline' if args.roofline else 'profiled'} costs: auto's choice/fastest split measured {over_best:.3f}"
    )
    if all(rule in f["measured"] for f in rounds):
        over_rule = statistics.median(f["measured"][f["chosen"]] / f["measured"][rule] for f in rounds)
        line += f", auto's choice/rule of thumb (M={rule}) {over_rule:.3f}"
    print(line + f" (median of {args.rounds} rounds)")
    return 0


def measure_round(args, tmp: Path) -> dict | None:
    """Compile the auto choice (every split profiled afresh into this round's cache), then run every
    split it compiled; each split's program comes out of the same cache, so it is the one auto costed."""
    config = CompileConfig(
        stages=args.stages,
        microbatches="auto",
        global_batch=args.global_batch,
        profile=not args.roofline,
        profile_cache=str(tmp / "cache"),
    )
    auto = compile_model(args.model, config)
    tried = [t for t in auto.program["costs"]["microbatch_choice"] if "rejected" not in t]
    predicted, measured = {}, {}
    for t in tried:
        M = t["microbatches"]
        result = compile_model(args.model, dataclasses.replace(config, microbatches=M))
        predicted[M] = result.program["costs"]["simulated_step_seconds"]
        assert abs(predicted[M] - t["step_seconds"]) <= 1e-9 * t["step_seconds"], (M, predicted[M], t)
        out = write_program(tmp / f"m{M}", result.program, result.files)
        record = tmp / f"m{M}_record"
        command = torchrun_command(out / "run.py", args.stages, "--steps", args.steps) + ["--record", record]
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return None
        _, times = recorded_run(record)
        measured[M] = statistics.median(times[len(times) // 3 :])
    return {"chosen": auto.program["schedule"]["microbatches"], "predicted": predicted, "measured": measured}


if __name__ == "__main__":
    sys.exit(main())
