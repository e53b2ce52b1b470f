"""``run.py``: train (or evaluate) a compiled program on ``torchrun`` ranks.

    torchrun --nproc-per-node 2 build/mini/run.py --steps 50 --lr 3e-3 --optimizer adamw

One line per step on the rank that owns the loss: mean loss over the step's micro-batches,
step time and tokens/s. A user error (wrong world size, an edited stage file, a lost
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

from ppcompile.runtime.executor import RankExecutor
from ppcompile.runtime.loader import ProgramError, load_program
from ppcompile.runtime.train import batches, build_spec, make_optimizer, tied_parameters
from ppcompile.runtime.transport import DistTransport, PeerError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Train a ppcompile program under torchrun.")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    parser.add_argument(
        "--seed", type=int, default=0, help="weights and data seed (same as the eager model's)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a receive may wait for its peer")
    parser.add_argument(
        "--record", type=Path, help="write per-rank losses, step-0 gradients and final parameters here"
    )
    return parser.parse_args(argv)


def main(program_dir: Path, argv: list[str]) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
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


def train(program, rank: int, world: int, args) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 or "MASTER_ADDR" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    # Every rank builds the model from the same factory and seed, then keeps only its stages.
    spec = build_spec(program, args.seed)
    transport = DistTransport(rank, len(program.data["boundaries"]), args.timeout, device)

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
    executor = RankExecutor(program, rank, spec.module, transport, device)
    spec = dataclasses.replace(spec, module=None)  # keep only this rank's stages alive
    groups = _tied_groups(program) if world > 1 else []
    tied = tied_parameters(program, executor)
    optimizer = make_optimizer(args.optimizer, executor.parameters(), args.lr)
    owns_loss = any(program.stage(s)["returns_loss"] for s in executor.stage_ids)
    data = batches(program, spec, args.seed)
    record = {"losses": [], "grads": {}, "params": {}}
    for step in range(args.steps):
        microbatches = next(data)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in executor.run(microbatches):
            pass  # a blocking transport never yields
        for params, group in zip(tied, groups):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if group is not None:
                    dist.all_reduce(p.grad, group=group)
        if args.record and step == 0:
            record["grads"] = _named(executor, lambda p: p.grad)
        optimizer.step()
        seconds = time.perf_counter() - start
        if owns_loss:
            losses = [float(executor.losses[m]) for m in sorted(executor.losses)]
            record["losses"].append(losses)
            tokens = sum(mb[program.data["inputs"][0]["name"]].numel() for mb in microbatches)
            print(
                f"step {step + 1}/{args.steps} | loss {sum(losses) / len(losses):.4f} | "
                f"{seconds * 1e3:.0f} ms | {tokens / seconds:,.0f} tokens/s",
                flush=True,
            )
    if args.record:
        record["params"] = _named(executor, lambda p: p.detach())
        args.record.mkdir(parents=True, exist_ok=True)
        torch.save(record, args.record / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _peer_ranks(program, rank: int) -> set[int]:
    rank_of = {s["id"]: s["rank"] for s in program.data["stages"]}
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
    """One process group per tied group; every rank creates every group, in the same order."""
    rank_of = {s["id"]: s["rank"] for s in program.data["stages"]}
    groups = []
    for group in program.data["tied_parameters"]:
        ranks = sorted({rank_of[s] for s in group["stages"]})
        pg = dist.new_group(ranks) if len(ranks) > 1 else None
        groups.append(pg if dist.get_rank() in ranks else None)
    return groups


def _named(executor: RankExecutor, get) -> dict:
    return {
        n: get(p).detach().cpu().clone() if get(p) is not None else None
        for m in executor.stages.values()
        for n, p in m.named_parameters()
    }
