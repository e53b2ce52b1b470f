"""Send calls on the computing thread or on a sender thread: gpt_mini on K ranks of this machine.

On CPU (gloo) a send call writes the message into the socket in the calling thread; where ranks
share cores it often loses its core on the way, and a middle stage makes two per micro-batch.
``run.py`` hands them to a thread of the rank's own (``ppcompile.runtime.transport.GlooSender``);
``--inline-sends`` makes them on the computing thread, as before; ``--sender-preempts`` keeps the
thread but under the normal scheduling policy, so that queuing a message may hand it the
computing thread's core (by default it runs under ``SCHED_BATCH``, which waits for a free core).
One program, launched alternately all three ways over ``--rounds``: per way the median step
time, each stage's mean send call and F+B per micro-batch (from ``--trace``), the stages' F+B
balance (slowest over mean), and the losses, which must be equal bit for bit.

    python bench/sends.py                     # gpt_mini, K=4, M=8, 3 rounds
    python bench/sends.py --stages 2 --rounds 1 --steps 12   # quicker
    python bench/sends.py --quick             # the test suite's smoke run

The last line prints sender thread / inline for the step time and the send call, and the sender
thread against the preempting one for those and the balance.
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

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from ppcompile.context import CompileConfig  # noqa: E402
from ppcompile.driver import compile_model  # noqa: E402
from ppcompile.launch import torchrun_command  # noqa: E402
from ppcompile.program import write_program  # noqa: E402
from ppcompile.replay import run_stage_costs, send_calls_by_stage  # noqa: E402

WAYS = {
    "sender thread": [],
    "sender, preempting": ["--sender-preempts"],
    "inline": ["--inline-sends"],
}


def launch(program_dir: Path, K: int, steps: int, extra: list[str]) -> dict:
    """One torchrun launch: median step time after a warm-up fifth, per stage the mean send call
    (ms) and F+B per micro-batch (ms), and the loss stage's losses."""
    trace, record = program_dir / "trace.json", program_dir / "record"
    command = torchrun_command(
        program_dir / "run.py", K, "--steps", steps, "--trace", trace, "--trace-steps", steps - 1
    )
    command += ["--record", str(record), *extra]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(map(str, command))}\n{run.stderr[-2000:]}")
    document = json.loads(trace.read_text())
    costs = run_stage_costs(document)
    calls: dict[int, list[float]] = {}
    for (stage, _), seconds in send_calls_by_stage(document).items():
        calls.setdefault(stage, []).extend(s * 1e3 for s in seconds)
    kept = torch.load(record / f"rank{K - 1}.pt")
    return {
        "step_ms": statistics.median(kept["step_seconds"][steps // 5 :]) * 1e3,
        "send_ms": [statistics.fmean(calls.get(s, [0.0])) for s in range(K)],
        "compute_ms": [(costs[s].forward + costs[s].backward) * 1e3 for s in range(K)],
        "losses": kept["losses"],
    }


def imbalance(got: dict) -> float:
    """The slowest stage's F+B per micro-batch over the mean stage's, in one launch."""
    return max(got["compute_ms"]) / statistics.fmean(got["compute_ms"])


def main() -> int:
    parser = argparse.ArgumentParser(description="send calls on the computing thread or a sender thread")
    parser.add_argument("--model", default="models/gpt.py:gpt_mini")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="launches of each way, alternating")
    parser.add_argument("--quick", action="store_true", help="a smoke run: K=2, M=4, 6 steps, one round")
    args = parser.parse_args()
    if args.quick:
        args.stages, args.microbatches, args.steps, args.rounds = 2, 4, 6, 1

    config = CompileConfig(stages=args.stages, microbatches=args.microbatches)
    result = compile_model(args.model, config)
    rows, found = [], {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        program_dir = write_program(Path(tmp) / "program", result.program, result.files)
        for r in range(args.rounds):
            for way, extra in WAYS.items():
                got = launch(program_dir, args.stages, args.steps, extra)
                found[way].append(got)
                rows.append(
                    [
                        r + 1,
                        way,
                        f"{got['step_ms']:.2f}",
                        " ".join(f"{s:.3f}" for s in got["send_ms"]),
                        " ".join(f"{c:.3f}" for c in got["compute_ms"]),
                        f"{imbalance(got):.3f}",
                    ]
                )
    print(f"{args.model}, K={args.stages}, M={args.microbatches}, {args.steps} steps per launch")
    print(
        tabulate(
            rows,
            headers=[
                "round",
                "sends",
                "step ms",
                "send call ms per stage",
                "F+B ms per stage",
                "F+B max/mean",
            ],
        )
    )
    reference = found["inline"][0]["losses"]
    same = all(got["losses"] == reference for runs in found.values() for got in runs)
    if not same:
        print("error: the losses differ between launches")
        return 1

    def median(way: str, key: str) -> float:
        if key == "balance":
            return statistics.median(imbalance(got) for got in found[way])
        values = [got[key] if key == "step_ms" else statistics.fmean(got[key]) for got in found[way]]
        return statistics.median(values)

    def ratio(way: str, other: str, key: str) -> float:
        return median(way, key) / median(other, key)

    print("losses bitwise equal in every launch: True")
    print(
        f"ratios: sender thread/inline step time {ratio('sender thread', 'inline', 'step_ms'):.3f}, "
        f"send call {ratio('sender thread', 'inline', 'send_ms'):.3f}; sender thread/preempting sender "
        f"step time {ratio('sender thread', 'sender, preempting', 'step_ms'):.3f}, send call "
        f"{ratio('sender thread', 'sender, preempting', 'send_ms'):.3f}, F+B max/mean "
        f"{median('sender thread', 'balance'):.3f} against {median('sender, preempting', 'balance'):.3f} "
        f"(medians of {args.rounds} rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
