"""How far the cost model can be trusted: predicted against measured, per stage.

1. Activation bytes saved per micro-batch, predicted by the compiler (meta-device costing) against
   the bytes autograd keeps at run time (saved_tensors_hooks). Goal: within 5% on every stage.
2. With --profile: predicted forward+backward time per stage (the sum of its nodes' measured
   times) against the stage run as a whole. Goal: within 15% on every stage.
3. Balance on measured time: the slowest measured stage over the mean. Goal: at most 1.05.

    python bench/cost_accuracy.py                      # gpt_mini and mlp at K=2 and 4
    python bench/cost_accuracy.py --models models/mlp.py:mlp --stages 2

The last line prints the worst ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tabulate import tabulate  # noqa: E402

from ppcompile.context import CompileConfig  # noqa: E402
from ppcompile.driver import compile_model  # noqa: E402
from ppcompile.measure import measure_stages  # noqa: E402
from ppcompile.program import write_program  # noqa: E402
from ppcompile.runtime.loader import load_program  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="predicted vs measured costs, per stage")
    parser.add_argument("--models", nargs="+", default=["models/gpt.py:gpt_mini", "models/mlp.py:mlp"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    rows, worst_bytes, worst_time, worst_balance = [], 1.0, 1.0, 1.0
    with tempfile.TemporaryDirectory() as tmp:
        for ref in args.models:
            for K in args.stages:
                config = CompileConfig(stages=K, microbatches=2 * K, profile=True, profile_cache=None)
                result = compile_model(ref, config)
                out = write_program(Path(tmp) / f"{Path(ref).stem}_{K}", result.program, result.files)
                program = load_program(out)
                measured = measure_stages(program, repeats=args.repeats)
                predicted = program.data["costs"]["stages"]
                memory = program.data["costs"]["memory"]
                times = [m.seconds for m in measured]
                balance = max(times) / (sum(times) / K)
                worst_balance = max(worst_balance, balance)
                for s, m in enumerate(measured):
                    bytes_ratio = memory[s]["activations_per_microbatch"] / max(m.saved_bytes, 1)
                    time_ratio = predicted[s]["compute_seconds"] / m.seconds
                    worst_bytes = max(worst_bytes, bytes_ratio, 1 / bytes_ratio)
                    worst_time = max(worst_time, time_ratio, 1 / time_ratio)
                    rows.append(
                        [
                            ref.split(":")[1],
                            K,
                            s,
                            f"{memory[s]['activations_per_microbatch'] / 1e6:.3f}",
                            f"{m.saved_bytes / 1e6:.3f}",
                            f"{bytes_ratio:.3f}",
                            f"{predicted[s]['compute_seconds'] * 1e3:.3f}",
                            f"{m.seconds * 1e3:.3f}",
                            f"{time_ratio:.3f}",
                            f"{balance:.3f}" if s == 0 else "",
                        ]
                    )
    headers = [
        "model",
        "K",
        "stage",
        "pred act MB",
        "meas act MB",
        "ratio",
        "pred ms",
        "meas ms",
        "ratio",
        "meas max/mean",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(
        f"ratios: worst activation bytes {worst_bytes:.3f} (goal <= 1.05), worst stage time {worst_time:.3f} "
        f"(goal <= 1.15), worst measured imbalance {worst_balance:.3f} (goal <= 1.05)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
