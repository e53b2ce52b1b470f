"""What ranks that share one machine cost each other: compute slowdown and message latency under load.

Profiling times each node alone in one process. When the program's K ranks then run as K processes
on the same CPU cores (a CPU machine under ``torchrun``), every rank computes slower (they share
cores, caches and memory bandwidth, and gloo's threads need a core too), and a message waits for
the sender's and receiver's communication threads to be scheduled. Both are properties of the
machine under the run's load, so they are measured under that load:

* ``slowdown``: the whole model's forward + backward in K processes at once, over the same
  step in one process while the others wait (seconds per step over a quarter second, the
  median over rounds, in the same worker code);
* ``spare_core_speedup``: that step alone on the rank's own threads over the same step alone
  on every core of the machine, what an action gains while the other ranks wait;
* the link's bandwidth: a message of a few KiB and one of a few MiB, sent with ``isend`` by a rank
  that keeps computing to a rank waiting on a posted ``irecv``, under gloo, the runtime's CPU
  backend: the large one's extra bytes over its extra time;
* the link's latency as a pipeline's steady state sees it: two busy ranks trade small messages
  (activations one way, gradients the other), each with its receive posted early and sending
  mid-compute, and each polls its receive between small pieces of work. gloo's threads need a
  core that the computing ranks hold, so a message lands far later than between an idle pair
  (about a millisecond against a tenth on two cores); the mean, since a step pays for the
  occasional slow message on average. The mean send call (the runtime's transport's) is the
  sender's own time.

Run as ``python -m ppcompile.contention WORKER-ARGS`` it is one of the K worker processes;
:func:`measure_contention` starts them and reads their answers.

    >>> measure_contention(ModelRef("models/gpt.py", "gpt_mini"), ranks=2)  # doctest: +SKIP
    Contention(ranks=2, slowdown=1.38, link_latency=0.00041, link_bandwidth=1.9e9)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ppcompile.errors import CompileError
from ppcompile.runtime.executor import available_cores
from ppcompile.runtime.heap import keep_freed_memory
from ppcompile.runtime.spec import ModelRef, call_forward, loss_of
from ppcompile.runtime.train import resized
from ppcompile.runtime.transport import DistTransport, MessageKey

SMALL_MESSAGE = 4 * 1024  # bytes: latency
LARGE_MESSAGE = 4 * 1024 * 1024  # bytes: bandwidth
MESSAGE_REPEATS = 40
EXCHANGE_PIECES = 32  # 128 x 128 matmuls per exchange: about 2 ms of a stage's work, polled between
ROUNDS = 5  # of timing alone, then together
MIN_SAMPLES = 3  # steps per timing, at least
MIN_SECONDS = 0.25  # per timing, at least
PROBE_TIMEOUT = 600  # seconds for the whole probe; a model that slow to build is the user's to see


@dataclass(frozen=True)
class Contention:
    ranks: int  # processes that were busy at once
    slowdown: float  # compute time with all of them busy over compute time alone
    link_latency: float  # mean seconds for a small message between two busy ranks
    link_bandwidth: float  # bytes/s for large messages
    send_seconds: float = 0.0  # a rank's own time in one send call, while the peer sends to it too
    idle_latency: float = 0.0  # mean seconds for a small message to a rank waiting for it
    cores: int = 1  # CPU cores this process may run on
    spare_core_speedup: float = 1.0  # one rank alone on every core over one alone on its own threads


def measure_contention(
    ref: ModelRef, ranks: int, threads: int = 1, trains: bool = True, shapes: list[list[int]] | None = None
) -> Contention:
    """Start ``ranks`` worker processes on this machine's CPU and measure what they cost each other
    (``trains`` False: each runs the forward alone, as inference does), each on the example
    inputs at ``shapes`` (None: as the factory makes them)."""
    with tempfile.TemporaryDirectory(prefix="ppc-contention-") as tmp:
        store = Path(tmp) / "store"
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ppcompile.contention",
                    ref.path,
                    ref.factory,
                    str(rank),
                    str(ranks),
                    str(threads),
                    str(store),
                    str(Path(tmp) / f"rank{rank}.json"),
                    "train" if trains else "infer",
                    json.dumps(shapes),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
            for rank in range(ranks)
        ]
        deadline = time.monotonic() + PROBE_TIMEOUT
        failures = []
        for rank, worker in enumerate(workers):
            try:
                _, err = worker.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                for w in workers:
                    w.kill()
                raise CompileError(
                    f"--profile: measuring {ranks} busy ranks took over {PROBE_TIMEOUT} s; "
                    "use --profile-concurrency 1 to time alone"
                ) from None
            if worker.returncode != 0:
                failures.append(
                    f"rank {rank}: {err.strip().splitlines()[-1] if err.strip() else worker.returncode}"
                )
        if failures:
            raise RuntimeError(f"contention probe failed: {'; '.join(failures)}")
        answer = json.loads((Path(tmp) / "rank0.json").read_text())
        receiver = json.loads((Path(tmp) / "rank1.json").read_text())
    small, large = receiver["small_seconds"], receiver["large_seconds"]
    bandwidth = (LARGE_MESSAGE - SMALL_MESSAGE) / max(large - small, 1e-9)
    # Both ranks of the exchange sent and received: average the two.
    send = (answer["send_seconds"] + receiver["send_seconds"]) / 2
    latency = (answer["busy_latency_seconds"] + receiver["busy_latency_seconds"]) / 2
    return Contention(
        ranks,
        answer["slowdown"],
        latency,
        bandwidth,
        send,
        small,
        answer["cores"],
        answer["spare_core_speedup"],
    )


# The worker ----------------------------------------------------------------------------------


def _worker(
    path: str,
    factory: str,
    rank: int,
    ranks: int,
    threads: int,
    store: str,
    out: str,
    trains: bool,
    shapes: list[list[int]] | None,
) -> None:
    torch.set_num_threads(threads)
    keep_freed_memory()  # run.py's heap on CPU
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    spec = ModelRef(path, factory).build("cpu", seed=0)
    params = [p for p in spec.module.parameters() if p.requires_grad]
    inputs = (
        spec.example_inputs
        if shapes is None
        else [resized(t, s) for t, s in zip(spec.example_inputs, shapes)]
    )

    def step():
        with torch.set_grad_enabled(trains):
            returned = call_forward(
                spec.module, spec.input_names, inputs, spec.input_groups, spec.none_inputs
            )
        loss = loss_of(returned) if trains else None
        if params and isinstance(loss, torch.Tensor) and loss.requires_grad:
            torch.autograd.grad([loss], params, allow_unused=True)

    for _ in range(2):
        step()  # warm-up
    # Alone: rank 0 computes while the others wait at the barrier (blocked, not spinning). Rounds
    # of alone-then-together, so that a change in the machine's other load hits both alike.
    # Alone on every core, too: what a rank gains from the others' cores while they wait on it
    # (a pipeline's bubbles; see ppcompile.spare_cores).
    ratios, speedups = [], []
    cores = available_cores()
    for _ in range(ROUNDS):
        alone = _mean_seconds(step) if rank == 0 else None
        if rank == 0 and cores > threads:
            torch.set_num_threads(cores)
            speedups.append(alone / _mean_seconds(step))
            torch.set_num_threads(threads)
        dist.barrier()
        together = _mean_seconds(step)
        dist.barrier()
        if alone:
            ratios.append(together / alone)
    answer: dict = {
        "slowdown": statistics.median(ratios) if ratios else None,
        "spare_core_speedup": statistics.median(speedups) if speedups else 1.0,
        "cores": cores,
    }
    if ranks > 1:
        answer.update(_link(rank))
    dist.barrier()
    Path(out).write_text(json.dumps(answer))
    dist.destroy_process_group()


def _mean_seconds(fn) -> float:
    """Seconds per call over at least MIN_SAMPLES calls and MIN_SECONDS. The mean, not the median:
    with more ranks than cores the scheduler hands out whole time slices, so most calls run at
    full speed and some wait a slice out, and a step pays for the waits on average."""
    calls, begin = 0, time.perf_counter()
    while calls < MIN_SAMPLES or time.perf_counter() - begin < MIN_SECONDS:
        fn()
        calls += 1
    return (time.perf_counter() - begin) / calls


def _link(rank: int) -> dict:
    """The link between ranks 0 and 1, while any other ranks keep computing. Send times travel in
    the messages; every clock is the machine's monotonic clock."""
    a = torch.randn(192, 192)

    def burst():  # about a millisecond of one core's work, the sender's "next action"
        for _ in range(8):
            a @ a

    return {**_one_way(rank, burst), **_exchange(rank, burst)}


def _one_way(rank: int, burst) -> dict:
    """Rank 0 sends while computing; rank 1 waits on a posted receive: each size's mean time."""
    answer = {}
    for label, nbytes in (("small_seconds", SMALL_MESSAGE), ("large_seconds", LARGE_MESSAGE)):
        message = torch.zeros(nbytes // 8, dtype=torch.float64)
        samples = []
        for _ in range(MESSAGE_REPEATS):
            dist.barrier()
            if rank == 0:
                burst()
                message[0] = time.perf_counter()
                work = dist.isend(message, 1)
                burst()
                work.wait()
            elif rank == 1:
                work = dist.irecv(message, 0)
                work.wait()
                samples.append(time.perf_counter() - message[0].item())
            else:
                burst()
                burst()
        if rank == 1:
            # The mean, not the median: a step pays for the occasional slow message on average.
            answer[label] = statistics.fmean(samples)
    return answer


def _exchange(rank: int, burst) -> dict:
    """Ranks 0 and 1 both busy, trading messages: the mean latency and send call."""
    # The pipeline's steady state: two busy ranks trade messages (activations one way, gradients
    # the other), each with its receive posted early, sending mid-compute. gloo's threads need a
    # core that the computing ranks hold, so a message lands later than between an idle pair:
    # each rank polls its receive between small pieces of work and notes when it landed. Sends go
    # through the runtime's own transport (its groups, its sender thread), so the send call timed
    # is the one a stage's SEND_F and SEND_B make.
    piece = torch.randn(128, 128)
    ranks = dist.get_world_size()
    transport = DistTransport(rank, num_stages=ranks, timeout=PROBE_TIMEOUT, device=torch.device("cpu"))
    peer = 1 - rank
    inbox = torch.zeros(SMALL_MESSAGE // 8, dtype=torch.float64)
    outbox = torch.zeros(SMALL_MESSAGE // 8, dtype=torch.float64)
    sends, delays = [], []
    for repeat in range(MESSAGE_REPEATS):
        dist.barrier()
        if rank not in (0, 1):
            burst()
            burst()
            continue
        incoming = MessageKey(repeat, rank == 0, peer, rank)
        receive = dist.irecv(
            inbox, peer, group=transport.group(peer, rank), tag=incoming.tag(transport.num_stages)
        )
        sent = landed = None
        for i in range(EXCHANGE_PIECES):
            piece @ piece
            if i == EXCHANGE_PIECES // 4:
                sent = time.perf_counter()
                outbox[0] = sent
                transport.send(MessageKey(repeat, rank == 1, rank, peer), [outbox], peer)
                sends.append(time.perf_counter() - sent)
            elif sent is not None and landed is None and receive.is_completed():
                landed = time.perf_counter()
        receive.wait()  # once: a gloo receive waited on twice never returns
        if landed is None:
            landed = time.perf_counter()
        delays.append(landed - inbox[0].item())
        transport.finish_step()
    if rank not in (0, 1):
        return {}
    return {"send_seconds": statistics.fmean(sends), "busy_latency_seconds": statistics.fmean(delays)}


if __name__ == "__main__":
    path, factory, rank, ranks, threads, store, out, mode, shapes = sys.argv[1:10]
    _worker(
        path, factory, int(rank), int(ranks), int(threads), store, out, mode == "train", json.loads(shapes)
    )
