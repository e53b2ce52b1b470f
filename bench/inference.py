"""Inference: a ppcompile program compiled with ``--schedule forward-only`` beside PyTorch's own
pipelining (``torch.distributed.pipelining``, the "peer") and eager, on CPU with gloo.

Same GPT (models/gpt.py), weights (seed 0) and data as ``bench/vs_pippy.py``. Systems timed:

- ppcompile: compiled for inference with ``--profile`` (forward times measured, no backward),
  run by ``run.py`` (forward only, without autograd);
- the peer with an even split (layers dealt out evenly): ``PipelineStage`` per rank and
  ``ScheduleGPipe`` without a loss, under ``torch.no_grad()``, its logits' losses computed after
  the timing;
- eager: one process on K threads (the cores the K ranks get), the M micro-batches' forwards
  under ``torch.no_grad()``.

Each round runs every system once, in turn; the median step after warm-up over all rounds is
reported. Every system's per-micro-batch losses are checked against eager's (relative 1e-5).
The last line prints the ratios.

    python bench/inference.py --layers 8 --d 256 --vocab 16384 --stages 2 --microbatches 8
    python bench/inference.py --quick
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
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

LOSS_RTOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ppcompile inference vs torch.distributed.pipelining, CPU/gloo")
    gb.add_gpt_arguments(p)
    p.add_argument("--steps", type=int, default=6, help="steps per system per round, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="steps of each run left out of the times")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="toy sizes, one round: the smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d, args.heads, args.seq, args.vocab, args.batch = 4, 32, 2, 16, 64, 8
        args.microbatches, args.steps, args.warmup, args.rounds = 4, 3, 1, 1
    return args


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_program(out: Path, stages: int, steps: int) -> dict:
    """``steps`` evaluation steps of the inference program under torchrun: losses and step seconds."""
    record = out / "record"
    gb.check_run(
        gb.torchrun(stages, out / "run.py", "--steps", str(steps), "--record", str(record)), "run.py"
    )
    losses, times = gb.recorded_run(record)
    return {"times": times, "losses": losses}


def run_eager(model_spec: str, microbatches: int, steps: int, threads: int) -> dict:
    """The single-process model's forwards, without autograd, on ``threads`` CPU threads."""
    from ppcompile.runtime.spec import ModelRef

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        spec = ModelRef.parse(model_spec).build("cpu", seed=0)
        data = gb.batches(spec, microbatches)
        times, losses = [], []
        with torch.no_grad():
            for _ in range(steps):
                chunks = [[c.clone() for c in t.chunk(microbatches)] for t in next(data)]
                start = time.perf_counter()
                step_losses = [spec.module(*(c[m] for c in chunks)) for m in range(microbatches)]
                times.append(time.perf_counter() - start)
                losses.append([float(loss) for loss in step_losses])
        return {"times": times, "losses": losses}
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    K, M = args.stages, args.microbatches
    config = gb.gpt_config(args)
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        work = Path(tmp)
        spec = gb.write_model_file(work, "gpt", config)
        log(f"model {spec}: {config}, K={K}, M={M}")
        program = work / "ppc_infer"
        seconds = gb.compile_program(spec, K, M, program, profile=True, schedule="forward-only")
        log(f"compiled for inference in {seconds:.1f} s -> {program}")
        even = gb.even_split(args.layers, K)
        times: dict[str, list[float]] = {"ppcompile": [], f"peer even {even}": [], "eager": []}
        losses: dict[str, list[list[float]]] = {name: [] for name in times}
        for round_ in range(args.rounds):
            runs = {
                "ppcompile": run_program(program, K, args.steps),
                f"peer even {even}": gb.run_peer(
                    spec, K, M, [even], args.steps, work / "peer.json", infer=True
                )["results"][0],
                "eager": run_eager(spec, M, args.steps, threads=K),
            }
            for name, run in runs.items():
                times[name] += gb.after_warmup(run["times"], args.warmup)
                losses[name] += run["losses"]
            log(
                f"round {round_ + 1}/{args.rounds}: "
                + ", ".join(
                    f"{name} {statistics.median(gb.after_warmup(run['times'], args.warmup)) * 1e3:.1f} ms"
                    for name, run in runs.items()
                )
            )
    medians = {name: statistics.median(t) for name, t in times.items()}
    differences = {name: gb.max_rel_diff(losses[name], losses["eager"]) for name in times}
    rows = [
        [
            name,
            f"{medians[name] * 1e3:.1f}",
            f"{medians['ppcompile'] / medians[name]:.3f}",
            f"{differences[name]:.1e}",
        ]
        for name in times
    ]
    print(
        tabulate(
            rows, headers=["system", "step ms", "ppcompile / system", "loss diff vs eager"], tablefmt="github"
        )
    )
    bad = [name for name, d in differences.items() if d > LOSS_RTOL]
    if bad:
        print(f"losses differ from eager's beyond {LOSS_RTOL:g}: {', '.join(bad)}")
        return 1
    peer = f"peer even {even}"
    print(
        f"ratios: inference step, K={K} M={M}: ppcompile/peer-even {medians['ppcompile'] / medians[peer]:.3f}, "
        f"ppcompile/eager({K} threads) {medians['ppcompile'] / medians['eager']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
