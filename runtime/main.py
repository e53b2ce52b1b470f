"""``run.py``: train (or evaluate) a compiled program on ``torchrun`` ranks.

    torchrun --nproc-per-node 2 build/mini/run.py --steps 50 --lr 3e-3 --optimizer adamw
    torchrun --nproc-per-node 2 build/mini/run.py --steps 5 --trace trace.json --trace-steps 2
    torchrun --nproc-per-node 2 build/mini/run.py --steps 5 --infer
    torchrun --nproc-per-node 2 build/classify/run.py --steps 5 --outputs outputs.pt

One line per step on the rank that owns the loss: mean loss over the step's micro-batches,
step time and tokens/s. ``--infer`` runs the forward-only inference schedule without autograd
or optimizer instead; a program compiled for inference (``--schedule forward-only``) always
does, and ``--outputs FILE`` saves what its forward returned. ``--trace`` writes, from rank 0,
a Chrome trace of every rank's actions in the last ``--trace-steps`` steps (see
``ppcompile.runtime.trace``). A user error (wrong world size, an edited stage file, a lost
peer) ends every rank with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ppcompile.runtime.actions import Action, ActionKind
from ppcompile.runtime.executor import RankExecutor, inference_actions, inference_schedule
from ppcompile.runtime.heap import keep_freed_memory
from ppcompile.runtime.loader import ProgramError, load_program
from ppcompile.runtime.outputs import joined
from ppcompile.runtime.trace import ActionTiming, measured_trace, shift_timings, write_trace
from ppcompile.runtime.train import OPTIMIZERS, batches, build_spec, make_optimizer, tied_parameters
from ppcompile.runtime.transport import DistTransport, PeerError

DEVICES = ("auto", "cpu", "cuda")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Train a ppcompile program under torchrun.")
    parser.add_argument(
        "--steps", type=int, default=10, help="optimizer steps (batches evaluated with --infer)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        help="[default: the one compiled for, ppcompile compile --optimizer]",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="weights and data seed (same as the eager model's)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a receive may wait for its peer")
    parser.add_argument(
        "--record",
        type=Path,
        help="write per-rank losses, step times, step-0 gradients and final parameters here",
    )
    parser.add_argument(
        "--infer", action="store_true", help="evaluate: forward only, no autograd, no optimizer"
    )
    parser.add_argument(
        "--outputs",
        type=Path,
        help="a program compiled for inference (--schedule forward-only): save what forward returned for "
        "each batch here (torch.save, a list per batch), the micro-batches joined along the batch dim",
    )
    parser.add_argument(
        "--trace", type=Path, help="write a Chrome trace (Perfetto) of every rank's actions to this file"
    )
    parser.add_argument(
        "--trace-steps", type=int, default=1, help="how many of the last steps --trace records (default 1)"
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where each rank computes: cuda takes GPU LOCAL_RANK (NCCL between ranks), cpu the "
        "processor (gloo); auto (the default) is cuda where torch sees a GPU, else cpu",
    )
    parser.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="on CPU, let malloc give freed memory back to the system (smaller resident memory, slower "
        "steps); by default freed blocks are kept for reuse, see ppcompile.runtime.heap",
    )
    parser.add_argument(
        "--inline-sends",
        action="store_true",
        help="on CPU (gloo), make each send call on the computing thread instead of a sender thread "
        "(slower where ranks share cores; for comparison)",
    )
    parser.add_argument(
        "--sender-preempts",
        action="store_true",
        help="on Linux, run the sender thread under the normal scheduling policy, so that queuing a "
        "message may hand it the computing thread's core (for comparison)",
    )
    return parser.parse_args(argv)


def main(program_dir: Path, argv: list[str]) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        _check_args(args, rank)
        program = load_program(program_dir)
        if world != program.num_ranks:
            raise ProgramError(
                f"this program has {program.num_ranks} ranks but torchrun started {world}; "
                f"use torchrun --nproc-per-node {program.num_ranks}"
            )
        return train(program, rank, world, args)
    except (ProgramError, PeerError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # skip process-group teardown, which would wait on the lost peer


def _check_args(args, rank: int) -> None:
    """Fail before any rank starts work rather than after the last step."""
    if args.steps < 1:
        raise ProgramError(f"--steps must be at least 1, got {args.steps}")
    if args.trace_steps < 1:
        raise ProgramError(f"--trace-steps must be at least 1, got {args.trace_steps}")
    if args.trace and rank == 0:
        try:
            args.trace.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ProgramError(f"cannot write --trace {args.trace}: {e.strerror}") from None


def rank_device(choice: str, rank: int, local_rank: int) -> torch.device:
    """The device ``--device`` gives this rank: one GPU per local rank, or the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ProgramError("--device cuda: torch sees no GPU on this machine; use --device cpu")
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        raise ProgramError(
            f"rank {rank} needs GPU {local_rank} but torch sees {gpus} GPU{'s' if gpus > 1 else ''} here; "
            f"run at most {gpus} rank{'s' if gpus > 1 else ''} per machine, or every rank on the CPU "
            "with --device cpu"
        )
    return torch.device(f"cuda:{local_rank}")


def train(program, rank: int, world: int, args) -> int:
    """Set up this rank, then train (or with ``--infer`` evaluate) for ``--steps`` steps."""
    device = rank_device(args.device, rank, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    elif not args.return_freed_memory:
        keep_freed_memory()
    if world > 1 or "MASTER_ADDR" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    # Every rank builds the model from the same factory and seed, then keeps only its stages.
    spec = build_spec(program, args.seed)
    if not program.trains:
        args.infer = True  # compiled for inference: it has no loss to train on
    elif args.outputs:
        raise ProgramError(
            "--outputs saves what an inference program returns; this program trains on its loss "
            "(compile it with --schedule forward-only for its outputs)"
        )
    if args.infer and rank == 0 and (note := training_mode_note(spec.module)):
        print(note, flush=True)
    transport = DistTransport(
        rank,
        program.num_stages,
        args.timeout,
        device,
        send_thread=not args.inline_sends,
        sender_preempts=args.sender_preempts,
    )

    peers = sorted(_peer_ranks(program, rank))

    def stopped_by_launcher(signum, frame):
        # torchrun stops the survivors when one rank dies; a receive blocked on the dead peer reports
        # itself (PeerError), so this runs when the signal lands between receives.
        where = f"in {transport.waiting}" if transport.waiting else "between actions"
        print(
            f"error: rank {rank}: stopped by torchrun {where}: a peer failed; this rank exchanges tensors "
            f"with rank{'s' if len(peers) > 1 else ''} {', '.join(map(str, peers))}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)

    signal.signal(signal.SIGTERM, stopped_by_launcher)
    executor = RankExecutor(program, rank, spec.module, transport, device, seed=args.seed)
    spec = dataclasses.replace(spec, module=None)  # keep only this rank's stages alive
    data = batches(program, spec, args.seed)
    loop = _evaluate if args.infer else _train
    record, traced = loop(program, executor, data, args)
    if cuda:
        print(_peak_memory_line(program, rank, device, args), flush=True)
    if args.trace:
        _write_trace(program, rank, world, traced, args)
    if args.record:
        record["params"] = _named(executor, lambda p: p.detach())
        record["buffers"] = {
            n: b.detach().cpu().clone() for m in executor.stages.values() for n, b in m.named_buffers()
        }
        args.record.mkdir(parents=True, exist_ok=True)
        torch.save(record, args.record / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


# Layers that compute otherwise in training than in evaluation.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)


def training_mode_note(model: nn.Module) -> str | None:
    """For ``--infer``: a line saying that the program evaluates as its model trains, where the
    factory built it in training mode and it holds layers that compute otherwise in evaluation.
    The stage files are the forward traced from that model, ``self.training`` branches decided.

    >>> training_mode_note(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))[:62]
    'note: inference runs the forward as compiled, in training mode'
    >>> training_mode_note(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).eval()) is None
    True
    """
    kinds = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if m.training and isinstance(m, _MODE_DEPENDENT) and getattr(m, "p", 1) != 0
        }
    )
    if not kinds:
        return None
    return (
        f"note: inference runs the forward as compiled, in training mode ({', '.join(kinds)} as in "
        "training), only without autograd; to evaluate, compile a factory that returns model.eval()"
    )


def _peak_memory_line(program, rank: int, device: torch.device, args) -> str:
    """The most GPU memory this rank's tensors held at once, beside the compiler's prediction of it."""
    line = f"rank {rank}: peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    predicted = program.data["costs"].get("memory")
    # The prediction is for the mode compiled: a training program's with its optimizer state.
    if predicted and (not args.infer or not program.trains):
        optimizer = program.optimizer
        total = sum(predicted[stage]["total"] for stage in program.stages_of_rank(rank))
        what = f"with {optimizer} state" if program.trains else "for inference"
        line += f" (the compiler predicted {total / 2**30:.2f} GiB {what})"
    return line


def _empty_record() -> dict:
    """What ``--record`` keeps: per step the losses and seconds, step 0's gradients, final parameters
    and buffers (a BatchNorm's running statistics)."""
    return {"losses": [], "step_seconds": [], "grads": {}, "params": {}, "buffers": {}}


def _train(program, executor: RankExecutor, data, args) -> tuple[dict, list[list[ActionTiming]]]:
    """``--steps`` optimizer steps; returns what ``--record`` saves and the traced steps' timings."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    groups = _tied_groups(program) if world > 1 else []
    tied = tied_parameters(program, executor)
    optimizer = make_optimizer(args.optimizer or program.optimizer, executor.parameters(), args.lr)
    record = _empty_record()
    traced = []
    for step in range(args.steps):
        microbatches = next(data)
        timings = _start_traced_step(executor) if _traced(step, args) else None
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in executor.run(microbatches, timings=timings):
            pass  # a blocking transport never yields
        reduce_start = time.perf_counter()
        reduced = False
        for params, (group, where) in zip(tied, groups):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if group is not None:
                    reduced = True
                    executor.transport.peer_call(
                        lambda g=p.grad, pg=group: dist.all_reduce(g, group=pg), where
                    )
        if args.record and step == 0:
            record["grads"] = _named(executor, lambda p: p.grad)
        update_start = time.perf_counter()
        optimizer.step()
        if executor.device.type == "cuda" and timings is not None:
            torch.cuda.synchronize(executor.device)
        seconds = time.perf_counter() - start
        if timings is not None:
            # The step's end, which the simulator prices apart from the pipeline: the tied
            # gradients' all-reduce (its wait for the slowest member included) and the update.
            first_stage = min(executor.stage_ids)
            if reduced:
                timings.append(_step_timing(first_stage, ActionKind.REDUCE_GRAD, reduce_start, update_start))
            timings.append(_step_timing(first_stage, ActionKind.OPT, update_start, start + seconds))
            traced.append(shift_timings(timings, start))
        _report(program, executor, microbatches, record, f"step {step + 1}/{args.steps}", seconds)
    return record, traced


def _evaluate(program, executor: RankExecutor, data, args) -> tuple[dict, list[list[ActionTiming]]]:
    """``--steps`` batches through the forward-only schedule, with autograd off and weights unchanged."""
    actions = inference_actions(program, executor.rank)
    record = _empty_record()
    traced, results = [], []
    batch_dims = program.output_batch_dims()
    with torch.no_grad():
        for step in range(args.steps):
            microbatches = next(data)
            timings = _start_traced_step(executor) if _traced(step, args) else None
            start = time.perf_counter()
            for _ in executor.run(microbatches, actions, timings):
                pass  # a blocking transport never yields
            seconds = time.perf_counter() - start
            if timings is not None:
                traced.append(shift_timings(timings, start))
            _report(program, executor, microbatches, record, f"eval step {step + 1}/{args.steps}", seconds)
            if executor.results:
                results.append(joined([executor.results[m] for m in sorted(executor.results)], batch_dims))
    if args.outputs and results:
        _save_outputs(args.outputs, results)
    return record, traced


def _save_outputs(path: Path, results: list) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(results, path)
    except OSError as e:
        raise ProgramError(f"cannot write --outputs {path}: {e.strerror}") from None
    print(f"wrote {path}: what forward returned for {len(results)} batches", flush=True)


def _step_timing(stage: int, kind: ActionKind, start: float, end: float) -> ActionTiming:
    return ActionTiming(str(Action(stage, kind, None)), kind.value, start, end)


def _traced(step: int, args) -> bool:
    return args.trace is not None and step >= args.steps - args.trace_steps


def _start_traced_step(executor: RankExecutor) -> list[ActionTiming]:
    """Line the ranks up so that a traced step starts at the same moment everywhere: each rank's times
    are then relative to its own exit from this barrier, which holds across machines whose clocks differ."""
    if executor.device.type == "cuda":
        torch.cuda.synchronize(executor.device)  # the previous step's kernels are not this step's time
    if dist.is_initialized():
        dist.barrier()
    return []


def _report(program, executor: RankExecutor, microbatches, record: dict, label: str, seconds: float) -> None:
    """On the rank that owns the loss (or an inference program's outputs): keep the step's losses
    and print its line."""
    if not executor.losses and not executor.results:
        return
    losses = [float(executor.losses[m]) for m in sorted(executor.losses)]
    record["losses"].append(losses)
    record["step_seconds"].append(seconds)
    tokens = sum(mb[program.data["inputs"][0]["name"]].numel() for mb in microbatches)
    loss = f" | loss {sum(losses) / len(losses):.4f}" if losses else ""
    print(f"{label}{loss} | {seconds * 1e3:.0f} ms | {tokens / seconds:,.0f} tokens/s", flush=True)


def _write_trace(program, rank: int, world: int, traced: list[list[ActionTiming]], args) -> None:
    """Gather every rank's timings on rank 0 and write one trace with the measured step and busy times."""
    per_rank = [traced]
    if dist.is_initialized():
        per_rank = [None] * world if rank == 0 else None
        dist.gather_object(traced, per_rank, dst=0)
    if rank != 0:
        return
    schedule = inference_schedule(program) if args.infer else program.data["schedule"]
    steps = [[per_rank[r][j] for r in range(world)] for j in range(len(traced))]
    metadata = {
        "schedule": schedule["name"],
        "microbatches": schedule["microbatches"],
        "virtual_stages": schedule.get("virtual_stages", 1),
        "mode": "inference" if args.infer else "training",
        "traced_steps": [args.steps - len(traced) + j + 1 for j in range(len(traced))],
    }
    try:
        write_trace(args.trace, measured_trace(steps, metadata))
    except OSError as e:
        raise ProgramError(f"cannot write --trace {args.trace}: {e.strerror}") from None
    print(f"wrote {args.trace} (open in https://ui.perfetto.dev)", flush=True)


def _peer_ranks(program, rank: int) -> set[int]:
    rank_of = program.rank_of_stage
    peers = set()
    for b in program.data["boundaries"]:
        ends = {rank_of[b["producer"]], *(rank_of[c] for c in b["consumers"])}
        if rank in ends:
            peers |= ends - {rank}
    for group in program.data["tied_parameters"]:
        ranks = {rank_of[s] for s in group["stages"]}
        if rank in ranks:
            peers |= ranks - {rank}
    return peers


def _tied_groups(program) -> list:
    """Per tied group, its process group (None where this rank is not in it) and what summing its
    gradients is, for error messages; every rank creates every group, in the same order."""
    rank_of = program.rank_of_stage
    groups = []
    for group in program.data["tied_parameters"]:
        ranks = sorted({rank_of[s] for s in group["stages"]})
        pg = dist.new_group(ranks) if len(ranks) > 1 else None
        peers = [r for r in ranks if r != dist.get_rank()]
        where = (
            f"summing the tied gradients it shares with the stages on rank{'s' if len(peers) > 1 else ''} "
            + ", ".join(map(str, peers))
        )
        groups.append((pg if dist.get_rank() in ranks else None, where))
    return groups


def _named(executor: RankExecutor, get) -> dict:
    named = {n: get(p) for m in executor.stages.values() for n, p in m.named_parameters()}
    return {n: None if t is None else t.detach().cpu().clone() for n, t in named.items()}
