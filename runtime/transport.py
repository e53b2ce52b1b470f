"""Point-to-point transports. A message carries every tensor one stage sends another for one
micro-batch in one direction: the activations a cut crosses forward, or their gradients back.

A cut inside a transformer block crosses the residual stream and the block's inner value; one
message instead of two halves what the cut costs in send calls, which on a shared CPU cost
more than the bytes. Several tensors travel packed end to end in one byte buffer
(:func:`pack`); the receiver copies them out (:func:`unpack`), so each received tensor owns its
memory, as a tensor sent alone does. A message of one tensor is sent as it is. A tensor whose
memory is not in its dims' order (``x + a.transpose(1, 2)``) travels in its memory's order, given by
the program (``dim_order``), and arrives laid out as it left: a kernel that reduces over it (a
BatchNorm) then sums in the order eager's does.

``DistTransport`` uses ``torch.distributed`` (gloo on CPU, NCCL on GPUs): sends are posted
at once and completed lazily (on gloo from a thread of the rank's own, :class:`GlooSender`,
as a gloo send call writes into the socket and is slow to return on a busy CPU); a receive waits at most ``timeout`` seconds and then fails
with a line naming this rank, the action and the peer. ``InProcessTransport`` runs every
rank in one process through the same executor: messages go into a mailbox, and a receive
whose message has not been sent yet tells the caller to let another rank run.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

ALIGNMENT = 16  # bytes: each packed tensor starts here, so its bytes can be viewed as its dtype


class PeerError(RuntimeError):
    """A receive that failed or timed out; the message is one line naming rank, action and peer."""


@dataclass(frozen=True)
class MessageKey:
    microbatch: int
    gradient: bool  # False: activations producer -> consumer; True: their gradients consumer -> producer
    src_stage: int
    dst_stage: int

    def tag(self, num_stages: int) -> int:
        return ((self.microbatch * num_stages + self.src_stage) * num_stages + self.dst_stage) * 2 + int(
            self.gradient
        )


@dataclass(frozen=True)
class Receive:
    """A message a receive action waits for: from which rank, and the tensors it carries, in order."""

    key: MessageKey
    peer_rank: int
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    # Per tensor, its dims outermost first in memory; () for its dims' own order.
    dim_orders: tuple[tuple[int, ...], ...] = ()

    def wire_buffer(self, device: torch.device) -> torch.Tensor:
        """An empty buffer for the message as it travels."""
        if len(self.shapes) == 1:
            shape = in_memory_order(self.shapes[0], self._dim_order(0))
            return torch.empty(shape, dtype=wire_dtype(self.dtypes[0]), device=device)
        return torch.empty(packed_size(self.shapes, self.dtypes), dtype=torch.uint8, device=device)

    def tensors(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """The tensors the message carries, from its wire buffer."""
        if len(self.shapes) == 1:
            tensor = buffer.bool() if self.dtypes[0] == torch.bool else buffer
            return [from_memory_order(tensor, self._dim_order(0))]
        return unpack(buffer, self.shapes, self.dtypes, self.dim_orders)

    def _dim_order(self, index: int) -> tuple[int, ...]:
        return self.dim_orders[index] if self.dim_orders else ()


def in_memory_order(shape, dim_order: tuple[int, ...]) -> torch.Size:
    """``shape``'s sizes outermost first in memory: the shape of the tensor as it travels.

    >>> in_memory_order(torch.Size([2, 3, 4]), (0, 2, 1))
    torch.Size([2, 4, 3])
    """
    return torch.Size([shape[d] for d in dim_order]) if dim_order else torch.Size(shape)


def from_memory_order(travelled: torch.Tensor, dim_order: tuple[int, ...]) -> torch.Tensor:
    """The tensor that travelled in memory order, as a view with its own dims' order again."""
    if not dim_order:
        return travelled
    inverse = sorted(range(len(dim_order)), key=dim_order.__getitem__)
    return travelled.permute(inverse)


def wire_bytes_of(tensor: torch.Tensor, dim_order: tuple[int, ...] = ()) -> torch.Tensor:
    """``tensor`` as the bytes it holds: detached, contiguous in ``dim_order`` (its dims outermost
    first in memory; () for their own order), and with a lazy conjugate or negation (``w.conj()``
    of a complex weight) applied, since neither survives a view as bytes."""
    tensor = tensor.detach().resolve_conj().resolve_neg()
    return (tensor.permute(dim_order) if dim_order else tensor).contiguous()


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool


def _offsets(shapes, dtypes) -> tuple[list[int], int]:
    offsets, end = [], 0
    for shape, dtype in zip(shapes, dtypes):
        start = -(-end // ALIGNMENT) * ALIGNMENT
        offsets.append(start)
        end = start + shape.numel() * dtype.itemsize
    return offsets, end


def packed_size(shapes, dtypes) -> int:
    """Bytes of the buffer that :func:`pack` makes for tensors of these shapes and dtypes."""
    return _offsets(shapes, dtypes)[1]


def pack(tensors: list[torch.Tensor], dim_orders=()) -> torch.Tensor:
    """The tensors' bytes end to end in one uint8 buffer, each at an ``ALIGNMENT`` boundary.

    >>> a, b = torch.arange(3.0), torch.tensor([True, False])
    >>> [t.tolist() for t in unpack(pack([a, b]), [a.shape, b.shape], [a.dtype, b.dtype])]
    [[0.0, 1.0, 2.0], [True, False]]
    """
    shapes, dtypes = [t.shape for t in tensors], [t.dtype for t in tensors]
    offsets, size = _offsets(shapes, dtypes)
    buffer = torch.empty(size, dtype=torch.uint8, device=tensors[0].device)
    for tensor, order, start in zip(tensors, dim_orders or [()] * len(tensors), offsets):
        flat = wire_bytes_of(tensor, order).reshape(-1).view(torch.uint8)
        buffer[start : start + flat.numel()].copy_(flat)
    return buffer


def unpack(buffer: torch.Tensor, shapes, dtypes, dim_orders=()) -> list[torch.Tensor]:
    """The tensors :func:`pack` put into ``buffer``, each a copy with its own memory, laid out in
    memory as ``dim_orders`` says (each clone keeps its view's layout)."""
    offsets, _ = _offsets(shapes, dtypes)
    return [
        from_memory_order(
            buffer[start : start + shape.numel() * dtype.itemsize]
            .view(dtype)
            .reshape(in_memory_order(shape, order)),
            order,
        ).clone()
        for shape, dtype, order, start in zip(shapes, dtypes, dim_orders or [()] * len(shapes), offsets)
    ]


def wire_payload(tensors: list[torch.Tensor], dim_orders=()) -> torch.Tensor:
    """What travels for a message of these tensors: the tensor itself when alone, else :func:`pack`;
    each in its memory order (``dim_orders``, per tensor; () or empty for their dims' own)."""
    if len(tensors) == 1:
        payload = wire_bytes_of(tensors[0], dim_orders[0] if dim_orders else ())
        return payload.to(wire_dtype(payload.dtype))
    return pack(tensors, dim_orders)


class InProcessTransport:
    """Every rank in one process; a shared mailbox stands in for the network."""

    def __init__(self):
        self.mailbox: dict[MessageKey, torch.Tensor] = {}
        self.sent = 0  # messages posted so far: lets the caller tell a deadlock from a wait

    def post(self, receives: list[Receive], action: str) -> None:
        pass  # the mailbox needs no receive posted ahead

    def send(self, key: MessageKey, tensors: list[torch.Tensor], peer_rank: int, dim_orders=()) -> None:
        # The sender's tensor itself, copied only when received: a real send reads it at some
        # time before the receive completes (gloo's from the rank's sender thread, after the rank
        # has gone on computing), so a sent tensor the sender changes later (a buffer forward
        # updates, sent as it is) arrives changed here as it may over the wire.
        self.mailbox[key] = wire_payload(tensors, dim_orders)
        self.sent += 1

    def try_receive(self, receives: list[Receive], action: str) -> list[list[torch.Tensor]] | None:
        if not all(r.key in self.mailbox for r in receives):
            return None
        # A copy, as the wire makes: the receiver must not alias the sender's tensors (unpack copies).
        payloads = [self.mailbox.pop(r.key) for r in receives]
        return [r.tensors(p.clone() if len(r.shapes) == 1 else p) for p, r in zip(payloads, receives)]

    def finish_step(self) -> None:
        pass


class DistTransport:
    """torch.distributed point-to-point; buffers are allocated from the program's shapes."""

    def __init__(
        self,
        rank: int,
        num_stages: int,
        timeout: float,
        device: torch.device,
        send_thread: bool = True,
        sender_preempts: bool = False,
    ):
        self.rank = rank
        self.num_stages = num_stages
        self.timeout = timeout
        self.device = device
        self.pending: list[tuple[dist.Work, torch.Tensor, int]] = []  # payload kept alive until sent
        self.waiting: str | None = None  # the receive in progress, for error messages
        self.posted: dict[str, tuple[list, list]] = {}  # action text -> receive buffers and works in flight
        # gloo carries both directions between two ranks on one connection, under one lock; when
        # both ranks send at once (1F1B's steady state: activations one way, gradients the other)
        # each isend can wait on the other side's thread, on a shared CPU for a scheduler tick.
        # A group per direction (messages to a higher rank, messages to a lower one) gives each
        # direction its own connection. Every rank makes both, in the same order.
        self.upward = self.downward = None
        if dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            ranks = list(range(dist.get_world_size()))
            self.upward, self.downward = dist.new_group(ranks), dist.new_group(ranks)
        self.sender = (
            GlooSender(self, preempts=sender_preempts) if send_thread and self.upward is not None else None
        )

    def send(self, key: MessageKey, tensors: list[torch.Tensor], peer_rank: int, dim_orders=()) -> None:
        payload = wire_payload(tensors, dim_orders)
        where = f"sending to stage {key.dst_stage} on rank {peer_rank}"
        group = self.group(self.rank, peer_rank)
        if self.sender is not None:
            self.sender.put(payload, peer_rank, group, key.tag(self.num_stages), where)
            return
        work = self.peer_call(
            lambda: dist.isend(payload, peer_rank, group=group, tag=key.tag(self.num_stages)), where
        )
        self.pending.append((work, payload, peer_rank))  # keep the payload alive until the send completes

    def post(self, receives: list[Receive], action: str) -> None:
        """Post the receives of a later action now, so its messages land while this rank computes."""
        if action in self.posted:
            return
        buffers, works = [], []
        for receive in receives:
            key, peer_rank = receive.key, receive.peer_rank
            buffer = receive.wire_buffer(self.device)
            where = f"{action} posting its receive from stage {key.src_stage} on rank {peer_rank}"
            group = self.group(peer_rank, self.rank)
            work = self.peer_call(
                lambda b=buffer, k=key, r=peer_rank, g=group: dist.irecv(
                    b, r, group=g, tag=k.tag(self.num_stages)
                ),
                where,
            )
            works.append((work, receive))
            buffers.append(buffer)
        self.posted[action] = (buffers, works)

    def try_receive(self, receives: list[Receive], action: str) -> list[list[torch.Tensor]]:
        self.post(receives, action)
        buffers, works = self.posted.pop(action)
        for work, receive in works:
            self.waiting = f"{action} waiting for stage {receive.key.src_stage} on rank {receive.peer_rank}"
            self.peer_call(lambda w=work: w.wait(timedelta(seconds=self.timeout)), self.waiting)
        self.waiting = None
        return [receive.tensors(buffer) for buffer, receive in zip(buffers, receives)]

    def finish_step(self) -> None:
        if self.sender is not None:
            self.sender.drain()
        for work, _, peer_rank in self.pending:
            where = f"completing a send to rank {peer_rank}"
            self.peer_call(lambda w=work: w.wait(timedelta(seconds=self.timeout)), where)
        self.pending.clear()

    def group(self, sender: int, receiver: int):
        """The process group a message from ``sender`` to ``receiver`` travels on (None: the default)."""
        return self.upward if receiver > sender else self.downward

    def peer_call(self, call, where: str):
        """``call()``, with gloo's failures (a timeout, a peer's closed connection) as one-line PeerErrors;
        ``where`` names what this rank was doing and with which peer, for the message."""
        try:
            return call()
        except Exception as e:
            text = str(e)
            if "imeout" in text or "imed out" in text:
                raise PeerError(
                    f"rank {self.rank}: timed out after {self.timeout:g} s in {where}; that rank died "
                    "or is stuck (raise --timeout if its stages are just slow)"
                ) from None
            raise PeerError(
                f"rank {self.rank}: lost the connection in {where}: {text.splitlines()[0][:160] if text else type(e).__name__}"
            ) from None


class GlooSender:
    """A thread that makes a rank's gloo send calls, so its computing thread only queues them.

    A gloo send call is not a hand-off: it writes the message into the socket in the calling
    thread, and on a machine whose cores the ranks share, the call often loses its core to the
    receiver's thread it wakes. On the computing thread a middle stage pays that twice per
    micro-batch (gpt_mini, 4 ranks on 2 cores: 0.3-1 ms a call against about 0.2 ms for the queue
    put). The thread calls the process group's own ``send``, not ``dist.isend``, whose Python
    checks would hold the GIL the computing thread wants back. Messages leave in the order queued.

    On Linux the thread runs under the ``SCHED_BATCH`` policy (unless ``preempts``): a thread woken
    under it does not take a core from the thread running there, so queuing a message no longer
    hands the computing thread's core to its own sender; the sender runs when a core is free
    (the rank waits on a receive) or at the next scheduler tick. gpt_mini, 4 ranks on 2 cores, one
    program launched alternately (``python bench/sends.py``): the mean send call takes 0.61x as
    long as with a thread that preempts, the step as long (1.005x), the stages' F+B as even.
    """

    def __init__(self, transport: DistTransport, preempts: bool = False):
        self.transport = transport
        self.preempts = preempts
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.unsent = 0  # queued, not yet handed to gloo
        self.changed = threading.Condition()
        self.failure: BaseException | None = (
            None  # a PeerError from the thread, raised on the computing thread
        )
        threading.Thread(target=self._run, name=f"rank{transport.rank}-sender", daemon=True).start()

    def put(self, payload: torch.Tensor, peer_rank: int, group, tag: int, where: str) -> None:
        if self.failure is not None:
            raise self.failure
        with self.changed:
            self.unsent += 1
        self.queue.put((payload, peer_rank, group, tag, where))

    def drain(self) -> None:
        """Wait until every queued message is handed to gloo; raise the PeerError of one that failed."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.unsent == 0, timeout=self.transport.timeout):
                raise PeerError(
                    f"rank {self.transport.rank}: {self.unsent} message(s) still queued to send after "
                    f"{self.transport.timeout:g} s; gloo did not take them"
                )
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        if not self.preempts:
            _wake_without_preempting()
        while True:
            item = self.queue.get()
            try:
                self._send(*item)
            except PeerError as e:
                self.failure = e
            with self.changed:
                self.unsent -= 1
                self.changed.notify_all()

    def _send(self, payload: torch.Tensor, peer_rank: int, group, tag: int, where: str) -> None:
        # Every group holds every rank in order, so a peer's rank in the group is its rank.
        work = self.transport.peer_call(lambda: group.send([payload], peer_rank, tag), where)
        self.transport.pending.append((work, payload, peer_rank))


def _wake_without_preempting() -> None:
    """Put the calling thread under Linux's ``SCHED_BATCH`` policy, which any user may choose;
    elsewhere, or where the system refuses, leave it as it is."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: the calling thread
    except (AttributeError, OSError):
        pass
