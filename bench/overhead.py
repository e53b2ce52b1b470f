"""Per-action overhead: ppcompile's runtime beside PyTorch's own pipelining when compute is ~0.

A tiny MLP (width 8) over K=2 ranks with many micro-batches (M=64), 1F1B, gloo on CPU, SGD lr 0: a
step is almost all schedule bookkeeping, autograd calls and point-to-point messages. Both systems run
the same model, weights, data and even split (the peer by hand: ``PipelineStage`` per rank,
``Schedule1F1B``; see ``bench/_gpt_bench.py``), alternating launch by launch over a few rounds. The
figure is the median step time divided by the actions each rank runs (ppcompile's lowered list: M
forwards, M backwards and their sends and receives; the peer's 1F1B does the same work). Eager (one
process, one thread, same micro-batches) is shown as the compute floor. The last line prints ppcompile/peer.

    python bench/overhead.py                  # K=2, M=64, width 8
    python bench/overhead.py --quick          # a few steps (the smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpt_bench as gb  # noqa: E402
from tabulate import tabulate  # noqa: E402

LOSS_RTOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="per-action overhead: ppcompile vs torch.distributed.pipelining")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--layers", type=int, default=4, help="hidden layers, dealt out evenly")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="steps per launch, warm-up included")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="few micro-batches and steps (the smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.microbatches, args.steps, args.warmup, args.rounds = 8, 3, 1, 1
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} leaves nothing after --warmup {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    K, M = args.stages, args.microbatches
    began = time.perf_counter()
    times: dict[str, list[float]] = {"ppcompile": [], "peer": [], "eager": []}
    losses: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="overhead_") as tmp:
        work = Path(tmp)
        config = dict(width=args.width, n_layer=args.layers, micro_batch=args.micro_batch)
        spec = gb.write_model_file(work, "mlp", config)
        out = work / "ppc"
        gb.compile_program(spec, K, M, out, profile=False)
        facts = gb.program_facts(out)
        split = gb.even_split(args.layers, K)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            run = gb.run_ppcompile(out, K, args.steps)
            times["ppcompile"] += gb.after_warmup(run["times"], args.warmup)
            losses.setdefault("ppcompile", run["losses"])
            peer = gb.run_peer(spec, K, M, [split], args.steps, work / "peer.json")["results"][0]
            times["peer"] += gb.after_warmup(peer["times"], args.warmup)
            losses.setdefault("peer", peer["losses"])
            eager = gb.run_eager(spec, M, args.steps, threads=1)
            times["eager"] += gb.after_warmup(eager["times"], args.warmup)
            losses.setdefault("eager", eager["losses"])

    actions = statistics.mean(facts["actions_per_rank"].values())
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in ["ppcompile", "peer", "eager"]:
        per_action = f"{med[name] / actions * 1e6:.1f}" if name != "eager" else ""
        diff = "reference" if name == "eager" else f"{gb.max_rel_diff(losses[name], losses['eager']):.1e}"
        rows.append(
            [
                name,
                f"{med[name] * 1e3:.2f}",
                f"{min(times[name]) * 1e3:.2f}",
                len(times[name]),
                per_action,
                diff,
            ]
        )
    print(
        f"MLP width {args.width}, {args.layers} layers, micro-batch {args.micro_batch}; K={K}, M={M}, 1F1B, "
        f"gloo on CPU; {actions:.0f} actions per rank ({2 * M} compute); "
        f"{args.rounds} round(s) x {args.steps - args.warmup} timed steps; {time.perf_counter() - began:.0f} s"
    )
    headers = ["system", "median step ms", "min ms", "steps", "us per action", "loss rel diff vs eager"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    checks = [gb.max_rel_diff(losses[n], losses["eager"]) for n in ("ppcompile", "peer")]
    ok = all(d <= LOSS_RTOL for d in checks)
    print(f"losses equal eager's within rtol {LOSS_RTOL:g}: {'yes' if ok else 'NO'}")
    print(
        f"ratios: ppcompile/peer {med['ppcompile'] / med['peer']:.3f} (per action: ppcompile "
        f"{med['ppcompile'] / actions * 1e6:.1f} us, peer {med['peer'] / actions * 1e6:.1f} us)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
