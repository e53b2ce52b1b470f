"""ppcompile beside PyTorch's own pipelining (``torch.distributed.pipelining``, the "peer"), on CPU with gloo.

Same GPT (models/gpt.py), same weights (seed 0, built as ppcompile's runtime builds them), same data
(the model's Markov-chain batches), same M and schedule (1F1B), both under torchrun, SGD with lr 0 so
every step computes the same thing. Systems timed:

- ppcompile, compiled with ``--profile --fuse-loss`` (measured node costs, the LM head and its
  loss computed blockwise; the headline), with ``--profile`` alone (the loss as the model writes
  it, so the gain of the fusion shows apart), and with ``--fuse-loss`` on roofline costs; the
  headline program also runs with ``run.py --return-freed-memory`` (glibc's default heap, as the
  peer and eager run), so what the runtime's kept heap wins shows apart (``ppcompile.runtime.heap``);
- the peer with an even split (layers dealt out evenly, as users do) and with the best hand split found
  by timing layer boundaries (every one for K=2, a steepest-descent search from the even split for K>2):
  the search's two fastest splits run in every round, and the one with the lower median is its best;
  the peer is built by hand: ``PipelineStage`` per rank around the rank's layers, ``Schedule1F1B``;
- eager: one process, the same M micro-batches with gradient accumulation;
- the bound: ppcompile's schedule replayed in the simulator with the stage times measured in the
  same run, every rank busy (``ppcompile simulate DIR --costs-from trace.json``); the simulated step
  from the ``--profile`` costs is shown beside it.

Each round launches every system once, in turn, so the systems alternate and share the machine's
drift; the median over all rounds' steps after warm-up is reported. Every system's per-micro-batch
losses are checked against eager's (relative 1e-5). The last line prints the ratios.

    python bench/vs_pippy.py --layers 8 --d 256 --vocab 16384 --stages 2 --microbatches 8
    python bench/vs_pippy.py --quick          # toy sizes, a few steps: the smoke test
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpt_bench as gb  # noqa: E402
from tabulate import tabulate  # noqa: E402

LOSS_RTOL = 1e-5
GOALS = {"peer-even": 0.75, "peer-best": 0.90, "bound": 1.10}
FINALISTS = 2  # splits from the search that run in every round


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ppcompile vs torch.distributed.pipelining on a GPT, CPU/gloo")
    gb.add_gpt_arguments(p)
    p.add_argument("--steps", type=int, default=4, help="steps per system per round, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="steps per launch left out of the median")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every system in turn")
    p.add_argument(
        "--search",
        choices=["auto", "all", "hill"],
        default="auto",
        help="peer-best search (auto: all for K=2)",
    )
    p.add_argument("--search-steps", type=int, default=1, help="timed steps per split in the search")
    p.add_argument("--no-roofline", action="store_true", help="skip ppcompile compiled without --profile")
    p.add_argument("--no-unfused", action="store_true", help="skip ppcompile compiled without --fuse-loss")
    p.add_argument(
        "--no-default-heap",
        action="store_true",
        help="skip the headline program run on glibc's default heap (run.py --return-freed-memory)",
    )
    p.add_argument("--keep", type=Path, help="keep the programs and records in this directory")
    p.add_argument("--quick", action="store_true", help="toy sizes and few steps (the smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d, args.heads, args.seq, args.vocab, args.batch = 2, 32, 4, 16, 64, 8
        args.microbatches = min(args.microbatches, 4)
        args.steps, args.warmup, args.rounds, args.search, args.search_steps = 3, 1, 1, "hill", 1
    if args.batch % args.microbatches:
        p.error(f"--batch {args.batch} does not split into --microbatches {args.microbatches}")
    if args.microbatches < args.stages:
        p.error(f"1F1B needs M >= K; got M={args.microbatches}, K={args.stages}")
    if args.steps <= args.warmup:
        p.error(f"--steps {args.steps} leaves nothing after --warmup {args.warmup}")
    return args


@dataclass
class System:
    """What one system measured over every round."""

    label: str
    cut: str  # layers per stage
    times: list[float] = field(default_factory=list)  # seconds per step, after warm-up, every round
    losses: list[list[float]] = field(default_factory=list)  # per step, per micro-batch (first launch)
    busy: list[list[float]] = field(default_factory=list)  # per measured step: compute seconds per rank
    bubbles: list[float] = field(default_factory=list)
    replayed: list[float] = field(
        default_factory=list
    )  # ppcompile: the schedule replayed with the run's stage times

    def add(self, times: list[float], losses: list[list[float]], warmup: int) -> None:
        self.times.extend(gb.after_warmup(times, warmup))
        self.losses = self.losses or losses

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def layer_ranges(per_stage: list[list[int]]) -> str:
    """Layer indices per stage, e.g. ``0-6 | 6-7`` when a cut falls inside block 6."""
    parts = []
    for layers in per_stage:
        parts.append(f"{min(layers)}-{max(layers)}" if layers else "-")
    return " | ".join(parts)


def program_layers(out: Path) -> list[list[int]]:
    import json

    program = json.loads((out / "program.json").read_text())
    layer = re.compile(r"(?:^|\.)h\.(\d+)\.")
    return [
        sorted({int(m.group(1)) for p in s["parameters"] if (m := layer.search(p))})
        for s in program["stages"]
    ]


def split_layers(split: list[int]) -> list[list[int]]:
    start, out = 0, []
    for n in split:
        out.append(list(range(start, start + n)))
        start += n
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    K, M = args.stages, args.microbatches
    config = gb.gpt_config(args)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_pippy_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = gb.write_model_file(work, "gpt", config)
        log(f"model {spec}: {config}, K={K}, M={M}")

        # name -> (directory, --profile, --fuse-loss)
        variants = {"ppcompile": (work / "ppc_profile", True, True)}
        if not args.no_unfused:
            variants["ppcompile unfused"] = (work / "ppc_unfused", True, False)
        if not args.no_roofline:
            variants["ppcompile roofline"] = (work / "ppc_roofline", False, True)
        programs = {name: out for name, (out, _, _) in variants.items()}
        # The headline program again, on glibc's default heap: what the runtime's kept heap wins.
        run_args = {name: () for name in programs}
        if not args.no_default_heap:
            programs["ppcompile default heap"] = programs["ppcompile"]
            run_args["ppcompile default heap"] = ("--return-freed-memory",)
        for name, (out, profile, fuse_loss) in variants.items():
            seconds = gb.compile_program(spec, K, M, out, profile=profile, fuse_loss=fuse_loss)
            log(f"compiled {name} in {seconds:.1f} s -> {out}")
        # Per compiled program: the default-heap run replays the headline's directory.
        facts = {name: gb.program_facts(out) for name, (out, _, _) in variants.items()}
        predicted = facts["ppcompile"]["simulated_step"]

        search = args.search if args.search != "auto" else ("all" if K == 2 else "hill")
        even = gb.even_split(args.layers, K)
        log(f"peer: searching splits ({search}) ...")
        found = gb.run_peer(
            spec, K, M, [], 0, work / "peer_search.json", search=search, search_steps=args.search_steps
        )
        searched = {tuple(r["split"]): statistics.mean(r["times"][1:]) for r in found["results"]}
        log("peer search: " + ", ".join(f"{list(s)} {t * 1e3:.0f} ms" for s, t in sorted(searched.items())))
        # A split timed for a step or two is a noisy pick: the two fastest go into the rounds, and
        # the peer's best is the one with the lower median there.
        finalists = [list(split) for split in sorted(searched, key=searched.get)[:FINALISTS]]
        peer_splits = [even] + [split for split in finalists if split != even]

        cut = {name: layer_ranges(program_layers(out)) for name, out in programs.items()}
        systems = {name: System(name, cut[name]) for name in programs}
        peer_systems = {
            tuple(split): System(f"peer {split}", layer_ranges(split_layers(split))) for split in peer_splits
        }
        threads = sorted({1, gb.torch.get_num_threads()})
        for n in threads:
            systems[f"eager-{n}"] = System(f"eager, 1 process, {n} thread{'s' * (n > 1)}", "all")
        for r in range(args.rounds):
            for name, out in programs.items():
                log(f"round {r + 1}/{args.rounds}: {name}")
                run = gb.run_ppcompile(out, K, args.steps, run_args=run_args[name])
                systems[name].add(run["times"], run["losses"], args.warmup)
                systems[name].busy.append(run["traced_busy"])
                systems[name].bubbles.append(gb.bubble(run["traced_step"], run["traced_busy"]))
                systems[name].replayed.append(run["replayed_step"])
            log(f"round {r + 1}/{args.rounds}: peer {peer_splits}")
            peer = gb.run_peer(spec, K, M, peer_splits, args.steps, work / f"peer_{r}.json")
            for result in peer["results"]:
                system = peer_systems[tuple(result["split"])]
                system.add(result["times"], result["losses"], args.warmup)
                for step, busy in list(zip(result["times"], result["busy"]))[args.warmup :]:
                    system.busy.append(busy)
                    system.bubbles.append(gb.bubble(step, busy))
            for n in threads:
                log(f"round {r + 1}/{args.rounds}: eager, {n} thread(s)")
                eager = gb.run_eager(spec, M, args.steps, threads=n)
                systems[f"eager-{n}"].add(eager["times"], eager["losses"], args.warmup)
        systems["peer-even"] = peer_systems[tuple(even)]
        best = min(finalists, key=lambda split: peer_systems[tuple(split)].median)
        systems["peer-best"] = peer_systems[tuple(best)]

    # The eager reference: the faster of one thread and every core (on a loaded machine OpenMP's threads
    # can wait on each other far longer than they save).
    eager = min((systems[f"eager-{n}"] for n in threads), key=lambda s: s.median)
    headline = systems["ppcompile"].median
    sim = facts["ppcompile"]
    bound = statistics.median(systems["ppcompile"].replayed)
    rows, checks = [], []
    order = [
        "ppcompile",
        "ppcompile unfused",
        "ppcompile roofline",
        "ppcompile default heap",
        "peer-even",
        "peer-best",
        *(f"eager-{n}" for n in threads),
    ]
    labels = {
        "ppcompile": "ppcompile (--profile --fuse-loss)",
        "ppcompile unfused": "ppcompile (--profile, loss as written)",
        "ppcompile roofline": "ppcompile (roofline costs, --fuse-loss)",
        "ppcompile default heap": "ppcompile (--profile --fuse-loss), run.py --return-freed-memory",
        "peer-even": "peer: even split",
        "peer-best": "peer: best split (searched)",
    }
    for name in order:
        if name not in systems or (name == "peer-best" and systems[name] is systems["peer-even"]):
            continue
        s = systems[name]
        if name.startswith("eager"):
            diff = "reference" if s is eager else f"{gb.max_rel_diff(s.losses, eager.losses):.1e}"
        else:
            checks.append((name, gb.max_rel_diff(s.losses, eager.losses)))
            diff = f"{checks[-1][1]:.1e}"
        busy = [statistics.median(b) for b in zip(*s.busy)] if s.busy else []
        rows.append(
            [
                labels.get(name, s.label),
                s.cut,
                f"{s.median * 1e3:.0f}",
                f"{min(s.times) * 1e3:.0f}",
                len(s.times),
                " / ".join(f"{b * 1e3:.0f}" for b in busy),
                f"{statistics.median(s.bubbles):.3f}" if s.bubbles else "",
                diff,
                f"{headline / s.median:.3f}",
            ]
        )
    rows.append(
        [
            "bound: schedule replayed with the run's stage times",
            cut["ppcompile"],
            f"{bound * 1e3:.0f}",
            "",
            "",
            "",
            "",
            "",
            f"{headline / bound:.3f}",
        ]
    )
    rows.append(
        [
            "predicted: simulated step, --profile --fuse-loss costs",
            cut["ppcompile"],
            f"{predicted * 1e3:.0f}",
            "",
            "",
            " / ".join(f"{b * 1e3:.0f}" for b in sim["simulated_busy"]),
            f"{sim['simulated_bubble']:.3f}",
            "",
            f"{headline / predicted:.3f}",
        ]
    )
    headers = [
        "system",
        "layers per stage",
        "median step ms",
        "min ms",
        "steps",
        "busy ms per rank",
        "bubble",
        "loss rel diff vs eager",
        "ppcompile / this",
    ]
    print(
        f"GPT {args.layers} layers, d={args.d}, {args.heads} heads, T={args.seq}, vocab {args.vocab}, "
        f"batch {args.batch}; K={K}, M={M} (micro-batch {args.batch // M}), 1F1B, gloo on CPU; "
        f"{args.rounds} round(s) x {args.steps - args.warmup} timed steps per system; "
        f"{time.perf_counter() - began:.0f} s"
    )
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(
        f"peer split search ({args.search_steps} timed step(s) each): "
        + ", ".join(f"{list(s)} {t * 1e3:.0f} ms" for s, t in sorted(searched.items()))
        + f"; the fastest {len(finalists)} ran in every round, best by median there: {best}"
    )
    ok = all(d <= LOSS_RTOL for _, d in checks)
    print(
        f"losses equal eager's within rtol {LOSS_RTOL:g}: {'yes' if ok else 'NO'} ("
        + ", ".join(f"{n} {d:.1e}" for n, d in checks)
        + ")"
    )
    ratios = {
        "peer-even": headline / systems["peer-even"].median,
        "peer-best": headline / systems["peer-best"].median,
        "bound": headline / bound,
        "eager": headline / eager.median,
    }
    # The headline beside each of its variants: (what the variant leaves out, headline/variant label).
    for name, what, against in (
        ("ppcompile unfused", "without --fuse-loss", "fused/unfused"),
        (
            "ppcompile default heap",
            "on glibc's default heap (run.py --return-freed-memory)",
            "kept heap/default heap",
        ),
    ):
        if name in systems:
            variant = systems[name].median
            print(
                f"{what}: ppcompile/peer-even {variant / systems['peer-even'].median:.3f}, "
                f"ppcompile/peer-best {variant / systems['peer-best'].median:.3f}; "
                f"{against} {headline / variant:.3f}"
            )
    print(
        "ratios: "
        + ", ".join(
            f"ppcompile/{n} {v:.3f}" + (f" (goal <= {GOALS[n]:.2f})" if n in GOALS else "")
            for n, v in ratios.items()
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
