"""Shared pieces of the benchmarks against PyTorch's own pipelining (``bench/vs_pippy.py``,
``bench/overhead.py``): the models, the "peer" torchrun worker, the eager reference, and the
launchers that run ppcompile programs and the peer and read back their step times and losses.

The peer is ``torch.distributed.pipelining`` used the manual way: every rank builds the whole model
from the same factory and seed as ppcompile's runtime (``ModelRef(path, factory).build("cpu", seed=0)``),
keeps the layers of its stage (the model file's ``peer_parts`` says what comes before the layers, what
after, and the loss), wraps them in a ``PipelineStage`` and runs ``Schedule1F1B`` over gloo. Tied
parameters (GPT's embedding and LM head) have their gradients summed across the ranks that hold them,
as ppcompile's runtime does, and an SGD step with the run's learning rate ends every step, so both
systems time the same work: zero_grad, the schedule, the tied all-reduce, the optimizer step.

This file is also the peer's torchrun entry point::

    torchrun --standalone --nproc-per-node 2 bench/_gpt_bench.py peer --model FILE.py:bench_model \
        --microbatches 8 --splits 4,4 --steps 4 --out peer.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ppcompile import ModelSpec  # noqa: E402
from ppcompile.launch import torchrun_command  # noqa: E402
from ppcompile.runtime.spec import ModelRef  # noqa: E402


def recorded_run(record: Path) -> tuple[list[list[float]], list[float]]:
    """Per step, the losses and the seconds ``run.py --record`` kept on the rank that owns the loss
    (the step times it prints, unrounded)."""
    for file in sorted(Path(record).glob("rank*.pt")):
        kept = torch.load(file)
        if kept["losses"]:
            return kept["losses"], kept["step_seconds"]
    raise RuntimeError(f"no rank in {record} recorded a loss")


# ----------------------------------------------------------------------------------------------
# Models: what ppcompile compiles (a factory) and how the peer cuts the same module by hand.


class Parts(NamedTuple):
    """A model as the peer sees it: ``post(layers[-1](...layers[0](pre(x))))`` then ``loss_fn(out, target)``."""

    pre: nn.Module | None  # runs on the first stage, before its layers
    layers: list[nn.Module]  # dealt out to the stages, contiguous
    post: nn.Module | None  # runs on the last stage, after its layers
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def gpt_module():
    """models/gpt.py, loaded by path as ppcompile loads model files."""
    factory = ModelRef(str(ROOT / "models" / "gpt.py"), "make_spec").load_factory()
    return sys.modules[factory.__module__]


def gpt_spec(
    n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int, micro_batch: int
) -> ModelSpec:
    gpt = gpt_module()
    config = gpt.GPTConfig(
        block_size=seq_len,
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        micro_batch=micro_batch,
        seq_len=seq_len,
    )
    return gpt.make_spec(config)


def add_gpt_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark GPT's sizes and the pipeline's K and M, as the GPT benchmarks take them."""
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks")
    parser.add_argument("--d", type=int, default=256, help="model width")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="sequence length T (and block size)")
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=32, help="rows per step; micro-batch = batch / M")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages K, one rank each")
    parser.add_argument("--microbatches", type=int, default=8, help="M")


def gpt_config(args: argparse.Namespace) -> dict:
    """``gpt_spec``'s keyword arguments from :func:`add_gpt_arguments`' options."""
    return dict(
        n_layer=args.layers,
        n_embd=args.d,
        n_head=args.heads,
        vocab_size=args.vocab,
        seq_len=args.seq,
        micro_batch=args.batch // args.microbatches,
    )


class GPTEmbed(nn.Module):
    """GPT.forward up to the first block, with the model's own modules."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding):
        super().__init__()
        self.wte, self.wpe = wte, wpe

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        return self.wte(idx) + self.wpe(pos)  # (B, T, C)


class GPTHead(nn.Module):
    """GPT.forward after the last block, up to the logits."""

    def __init__(self, ln_f: nn.LayerNorm, lm_head: nn.Linear):
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, x):
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def gpt_peer_parts(model) -> Parts:
    t = model.transformer
    return Parts(GPTEmbed(t.wte, t.wpe), list(t.h), GPTHead(t.ln_f, model.lm_head), gpt_loss)


class TinyMLP(nn.Module):
    """An MLP so small that a step is all overhead: width 8, a few layers, mean-squared-error loss."""

    def __init__(self, width: int, n_layer: int):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.h = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(n_layer)])
        self.out = nn.Linear(width, width)

    def forward(self, x, y):
        x = self.inp(x)  # (B, W)
        for layer in self.h:
            x = layer(x)  # (B, W)
        return F.mse_loss(self.out(x), y)


def _mlp_data(width: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rng = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(batch_size, width, generator=rng), torch.randn(batch_size, width, generator=rng)


def mlp_spec(width: int, n_layer: int, micro_batch: int) -> ModelSpec:
    model = TinyMLP(width, n_layer)
    example = (torch.randn(micro_batch, width), torch.randn(micro_batch, width))
    return ModelSpec(model, example, data=functools.partial(_mlp_data, width))


def mlp_peer_parts(model) -> Parts:
    return Parts(model.inp, list(model.h), model.out, F.mse_loss)


MODEL_FILE = '''"""Generated by bench/_gpt_bench.py: the benchmark's model, for ppcompile and for the peer."""

import sys

sys.path.insert(0, {bench!r})

import _gpt_bench as _b  # noqa: E402


def bench_model():
    return _b.{spec}(**{config!r})


def peer_parts(model):
    return _b.{parts}(model)
'''


def write_model_file(directory: Path, kind: str, config: dict) -> str:
    """A model file exposing ``bench_model`` (the ppcompile factory) and ``peer_parts``; returns its SPEC."""
    spec, parts = {"gpt": ("gpt_spec", "gpt_peer_parts"), "mlp": ("mlp_spec", "mlp_peer_parts")}[kind]
    path = Path(directory) / f"bench_{kind}.py"
    path.write_text(MODEL_FILE.format(bench=str(BENCH), spec=spec, config=dict(config), parts=parts))
    return f"{path}:bench_model"


def batches(spec: ModelSpec, microbatches: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """Whole batches of M micro-batches from the model's data, as ppcompile's runtime draws them."""
    micro = spec.example_inputs[0].shape[0]
    return spec.data(microbatches * micro, seed)


# ----------------------------------------------------------------------------------------------
# Eager reference: one process, the same M micro-batches with gradient accumulation.


def run_eager(
    model_spec: str, microbatches: int, steps: int, lr: float = 0.0, threads: int | None = None
) -> dict:
    """Step times (seconds) and per-micro-batch losses of the single-process model, on ``threads`` CPU
    threads (default: torch's, i.e. every core)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _eager_steps(model_spec, microbatches, steps, lr)
    finally:
        torch.set_num_threads(before)


def _eager_steps(model_spec: str, microbatches: int, steps: int, lr: float) -> dict:
    spec = ModelRef.parse(model_spec).build("cpu", seed=0)
    model, data = spec.module, batches(spec, microbatches)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    times, losses = [], []
    for _ in range(steps):
        chunks = [[c.clone() for c in t.chunk(microbatches)] for t in next(data)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_losses = []
        for m in range(microbatches):
            loss = model(*(c[m] for c in chunks))
            (loss / microbatches).backward()
            step_losses.append(loss.item())
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(step_losses)
    return {"times": times, "losses": losses, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# ppcompile: compile with the CLI, run with torchrun, read step lines, --record and --trace.


def torchrun(nproc: int, script: str | Path, *args: str) -> list[str]:
    return torchrun_command(script, nproc, *args)


def check_run(command: list[str], what: str) -> subprocess.CompletedProcess:
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
        raise SystemExit(f"{what} failed (exit {run.returncode}): {' '.join(command)}\n{tail}")
    return run


def compile_program(
    model_spec: str,
    stages: int,
    microbatches: int,
    out: Path,
    profile: bool,
    fuse_loss: bool = False,
    schedule: str = "1f1b",
) -> float:
    """``ppcompile compile`` into ``out``; returns the compile's wall time in seconds."""
    command = [sys.executable, "-m", "ppcompile", "compile", model_spec, "--stages", str(stages)]
    command += [
        "--microbatches",
        str(microbatches),
        "--schedule",
        schedule,
        "--optimizer",
        "sgd",
        "-o",
        str(out),
    ]
    if profile:  # measured afresh: a cached profile may come from a busier or quieter machine
        command += ["--profile", "--profile-cache", "none"]
    if fuse_loss:
        command += ["--fuse-loss"]
    start = time.perf_counter()
    check_run(command, "ppcompile compile")
    return time.perf_counter() - start


def program_facts(out: Path) -> dict:
    """From program.json: the simulated step (the bound), actions per rank and layers per stage."""
    from ppcompile.replay import simulate_program

    program = json.loads((Path(out) / "program.json").read_text())
    sim = simulate_program(program)
    actions = {int(r): len(text.split()) for r, text in program["schedule"]["ranks"].items()}
    return {
        "simulated_step": sim.step_time,
        "simulated_bubble": sim.overall_bubble_fraction,
        "simulated_busy": list(sim.busy_time),
        "actions_per_rank": actions,
        "stage_seconds": [s["seconds"] for s in program["costs"]["stages"]],
    }


def run_ppcompile(
    out: Path, stages: int, steps: int, lr: float = 0.0, run_args: tuple[str, ...] = ()
) -> dict:
    """``steps`` timed steps plus one traced step (left out of the times: its barrier lines ranks up);
    ``run_args`` go to run.py as they are."""
    record, trace = Path(out) / "record", Path(out) / "trace.json"
    command = torchrun(stages, Path(out) / "run.py", "--steps", steps + 1, "--optimizer", "sgd", *run_args)
    command += ["--lr", repr(lr), "--record", str(record), "--trace", str(trace), "--trace-steps", str(steps)]
    check_run(command, "ppcompile run.py")
    losses, times = recorded_run(record)
    from ppcompile.replay import run_stage_costs, simulate_program
    from ppcompile.runtime.trace import read_trace_times

    step, busy = read_trace_times(trace)
    # The bound: the schedule replayed with the stage times this run measured (every rank busy).
    program = json.loads((Path(out) / "program.json").read_text())
    replayed = simulate_program(program, costs=run_stage_costs(json.loads(trace.read_text())))
    return {
        "times": times[:steps],
        "losses": losses[:steps],
        "traced_step": step,
        "traced_busy": busy,
        "replayed_step": float(replayed.step_time),
    }


# ----------------------------------------------------------------------------------------------
# The peer: torch.distributed.pipelining, PipelineStage by hand, Schedule1F1B, gloo.


def run_peer(
    model_spec: str,
    stages: int,
    microbatches: int,
    splits: list[list[int]],
    steps: int,
    out_json: Path,
    search: str = "none",
    search_warmup: int = 1,
    search_steps: int = 2,
    lr: float = 0.0,
    infer: bool = False,
) -> dict:
    """One torchrun launch: optionally a search for the fastest split, then ``steps`` steps per split
    (forward-only ones with ``infer``)."""
    command = torchrun(stages, Path(__file__), "peer", "--model", model_spec, "--microbatches", microbatches)
    command += ["--infer"] if infer else []
    command += ["--steps", steps, "--out", str(out_json), "--lr", repr(lr), "--search", search]
    command += ["--search-warmup", search_warmup, "--search-steps", search_steps]
    for split in splits:
        command += ["--split", ",".join(map(str, split))]
    check_run([str(c) for c in command], "peer (torch.distributed.pipelining)")
    return json.loads(Path(out_json).read_text())


def even_split(n_layer: int, stages: int) -> list[int]:
    """Layers dealt out evenly, as users do by hand; the first stages take the remainder."""
    base, extra = divmod(n_layer, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def valid_split(split: list[int] | tuple[int, ...], n_layer: int) -> bool:
    """Every layer placed; a middle stage holds at least one layer (the first and last have pre and post)."""
    return sum(split) == n_layer and all(n >= 0 for n in split) and all(n >= 1 for n in split[1:-1])


def all_splits(n_layer: int, stages: int) -> list[list[int]]:
    cuts = itertools.combinations_with_replacement(range(n_layer + 1), stages - 1)
    splits = [[b - a for a, b in zip((0, *c), (*c, n_layer))] for c in cuts]
    return [s for s in splits if valid_split(s, n_layer)]


class _StageModule(nn.Module):
    def __init__(self, pre: nn.Module | None, layers: list[nn.Module], post: nn.Module | None):
        super().__init__()
        self.pre, self.layers, self.post = pre, nn.ModuleList(layers), post

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        for layer in self.layers:
            x = layer(x)
        if self.post is not None:
            x = self.post(x)
        return x


def _stage_modules(parts: Parts, split: list[int]) -> list[_StageModule]:
    bounds = list(itertools.accumulate([0, *split]))
    last = len(split) - 1
    return [
        _StageModule(
            parts.pre if s == 0 else None,
            parts.layers[bounds[s] : bounds[s + 1]],
            parts.post if s == last else None,
        )
        for s in range(len(split))
    ]


def _timed(fn, busy: list[float]):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            busy[0] += time.perf_counter() - start

    return wrapper


class _Peer:
    """This rank's side of the peer: measures splits; every rank takes part in every measurement."""

    def __init__(self, args):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.args = args
        ref = ModelRef.parse(args.model)
        self.spec = ref.build("cpu", seed=0)
        self.parts = ModelRef(ref.path, "peer_parts").load_factory()(self.spec.module)
        self.groups: dict[tuple[int, ...], object] = {}
        self.results: list[dict] = []

    def _tied(self, modules: list[_StageModule]) -> list[tuple[nn.Parameter, object]]:
        """(parameter, process group) for each parameter of this rank's stage held by several stages."""
        holders: dict[int, list[int]] = {}
        for s, m in enumerate(modules):
            for p in m.parameters():
                holders.setdefault(id(p), []).append(s)
        tied = []
        for ranks in sorted({tuple(r) for r in holders.values() if len(r) > 1}):
            if ranks not in self.groups:  # every rank creates every group, in the same order
                self.groups[ranks] = self.dist.new_group(list(ranks))
        for p in modules[self.rank].parameters():
            ranks = tuple(holders[id(p)])
            if len(ranks) > 1:
                tied.append((p, self.groups[ranks]))
        return tied

    def measure(self, split: list[int], steps: int, phase: str) -> dict:
        """``steps`` training steps of the 1F1B pipeline cut as ``split``; the result as the last rank saw it."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        M, K = self.args.microbatches, self.world
        modules = _stage_modules(self.parts, split)
        module = modules[self.rank]
        stage = PipelineStage(module, self.rank, K, torch.device("cpu"))
        schedule = Schedule1F1B(stage, M, loss_fn=self.parts.loss_fn)
        busy = [0.0]
        stage.forward_one_chunk = _timed(stage.forward_one_chunk, busy)
        stage.backward_one_chunk = _timed(stage.backward_one_chunk, busy)
        schedule._compute_loss = _timed(schedule._compute_loss, busy)
        tied = self._tied(modules)
        optimizer = torch.optim.SGD(module.parameters(), lr=self.args.lr)
        data = batches(self.spec, M)  # every split sees the same batches, as every system does
        times, losses, busy_per_step = [], [], []
        for _ in range(steps):
            inputs, targets = next(data)
            step_losses: list[torch.Tensor] = []
            busy[0] = 0.0
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if self.rank == 0:
                schedule.step(inputs)
            elif self.rank == K - 1:
                schedule.step(target=targets, losses=step_losses)
            else:
                schedule.step()
            for p, group in tied:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.all_reduce(p.grad, group=group)
            optimizer.step()
            times.append(time.perf_counter() - start)
            busy_per_step.append(busy[0])
            losses.append([float(x.detach()) for x in step_losses])
        every = [None] * K
        self.dist.all_gather_object(every, {"times": times, "losses": losses, "busy": busy_per_step})
        last = every[K - 1]
        result = {
            "split": list(split),
            "phase": phase,
            "times": last["times"],
            "losses": last["losses"],
            "busy": [[every[r]["busy"][i] for r in range(K)] for i in range(steps)],
        }
        self.results.append(result)
        return result

    def measure_inference(self, split: list[int], steps: int) -> dict:
        """``steps`` forward-only steps (GPipe without a loss, under ``torch.no_grad()``) cut as
        ``split``; the last rank's per-micro-batch losses are computed from the logits after timing."""
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        M, K = self.args.microbatches, self.world
        module = _stage_modules(self.parts, split)[self.rank]
        stage = PipelineStage(module, self.rank, K, torch.device("cpu"))
        schedule = ScheduleGPipe(stage, M)
        data = batches(self.spec, M)
        times, losses = [], []
        with torch.no_grad():
            for _ in range(steps):
                inputs, targets = next(data)
                start = time.perf_counter()
                output = schedule.step(inputs) if self.rank == 0 else schedule.step()
                times.append(time.perf_counter() - start)
                if self.rank == K - 1:
                    losses.append(
                        [float(self.parts.loss_fn(o, t)) for o, t in zip(output.chunk(M), targets.chunk(M))]
                    )
        every = [None] * K
        self.dist.all_gather_object(every, {"times": times, "losses": losses})
        result = {"split": list(split), "phase": "infer", **every[K - 1]}
        self.results.append(result)
        return result

    def search_time(self, split: list[int]) -> float:
        a = self.args
        result = self.measure(split, a.search_warmup + a.search_steps, "search")
        return statistics.mean(result["times"][a.search_warmup :])

    def search(self, n_layer: int) -> list[int]:
        """The fastest split found: every one (``all``), or steepest descent from the even split (``hill``),
        moving one layer across one boundary at a time while that makes the step faster."""
        K = self.world
        if self.args.search == "all":
            timed = {tuple(s): self.search_time(s) for s in all_splits(n_layer, K)}
            return list(min(timed, key=timed.get))
        current = tuple(even_split(n_layer, K))
        timed = {current: self.search_time(list(current))}
        while True:
            neighbours = []
            for i, delta in itertools.product(range(K - 1), (-1, 1)):
                s = list(current)
                s[i] += delta
                s[i + 1] -= delta
                if valid_split(s, n_layer) and tuple(s) not in timed:
                    neighbours.append(tuple(s))
            for s in neighbours:
                timed[s] = self.search_time(list(s))
            best = min(timed, key=timed.get)
            if best == current or len(timed) >= self.args.search_limit:
                return list(best)
            current = best


def peer_main(argv: list[str]) -> int:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="_gpt_bench.py peer")
    parser.add_argument("--model", required=True, help="PATH.py:FACTORY; the file also defines peer_parts")
    parser.add_argument("--microbatches", type=int, required=True)
    parser.add_argument(
        "--split", action="append", default=[], help="layers per stage, e.g. 6,2 (repeatable)"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--search", choices=["none", "hill", "all"], default="none")
    parser.add_argument("--search-warmup", type=int, default=1)
    parser.add_argument("--search-steps", type=int, default=2)
    parser.add_argument("--search-limit", type=int, default=16, help="most splits the hill search times")
    parser.add_argument(
        "--infer", action="store_true", help="forward-only steps (GPipe, no loss, no autograd)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    peer = _Peer(args)
    n_layer = len(peer.parts.layers)
    best = peer.search(n_layer) if args.search != "none" else None
    for text in args.split:
        split = [int(n) for n in text.split(",")]
        if args.infer:
            peer.measure_inference(split, args.steps)
        else:
            peer.measure(split, args.steps, "measure")
    if peer.rank == 0:
        args.out.write_text(json.dumps({"best": best, "results": peer.results}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------
# Figures.


def after_warmup(times: list[float], warmup: int) -> list[float]:
    return times[warmup:] if len(times) > warmup else times[-1:]


def max_rel_diff(losses: list[list[float]], reference: list[list[float]]) -> float:
    """Largest relative difference of per-micro-batch losses over the steps both ran."""
    worst = 0.0
    steps = min(len(losses), len(reference))
    if steps == 0:
        return math.inf
    for got, want in zip(losses[:steps], reference[:steps]):
        if len(got) != len(want):
            return math.inf
        for g, w in zip(got, want):
            worst = max(worst, abs(g - w) / max(abs(w), 1e-30))
    return worst


def bubble(step: float, busy: list[float]) -> float:
    return 1 - sum(busy) / (len(busy) * step)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        sys.exit(peer_main(sys.argv[2:]))
    sys.exit("usage: torchrun ... bench/_gpt_bench.py peer --model FILE.py:bench_model ...")
