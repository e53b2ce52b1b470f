"""Point-to-point transports. A message is one tensor for one (boundary, micro-batch, direction).

``DistTransport`` uses ``torch.distributed`` (gloo on CPU, NCCL on GPUs): sends are posted
at once and completed lazily; a receive waits at most ``timeout`` seconds and then fails
with a line naming this rank, the action and the peer. ``InProcessTransport`` runs every
rank in one process through the same executor: messages go into a mailbox, and a receive
whose message has not been sent yet tells the caller to let another rank run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """A receive that failed or timed out; the message is one line naming rank, action and peer."""


@dataclass(frozen=True)
class MessageKey:
    boundary: int  # index of the boundary tensor in program.json
    microbatch: int
    gradient: bool  # False: activation producer -> consumer; True: gradient consumer -> producer
    src_stage: int
    dst_stage: int

    def tag(self, num_boundaries: int) -> int:
        return (self.microbatch * num_boundaries + self.boundary) * 2 + int(self.gradient)


class InProcessTransport:
    """Every rank in one process; a shared mailbox stands in for the network."""

    def __init__(self):
        self.mailbox: dict[MessageKey, torch.Tensor] = {}
        self.sent = 0  # messages posted so far: lets the caller tell a deadlock from a wait

    def post(self, keys, action: str) -> None:
        pass  # the mailbox needs no receive posted ahead

    def send(self, key: MessageKey, tensor: torch.Tensor, peer_rank: int) -> None:
        # A copy, as the wire would make: the receiver must not alias the sender's tensor.
        self.mailbox[key] = tensor.detach().clone()
        self.sent += 1

    def try_receive(self, keys: list[tuple[MessageKey, int, torch.Size, torch.dtype]], action: str):
        if not all(key in self.mailbox for key, *_ in keys):
            return None
        return [self.mailbox.pop(key) for key, *_ in keys]

    def finish_step(self) -> None:
        pass


class DistTransport:
    """torch.distributed point-to-point; buffers are allocated from the program's shapes."""

    def __init__(self, rank: int, num_boundaries: int, timeout: float, device: torch.device):
        self.rank = rank
        self.num_boundaries = num_boundaries
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

    def send(self, key: MessageKey, tensor: torch.Tensor, peer_rank: int) -> None:
        payload = tensor.detach().contiguous()
        if payload.dtype == torch.bool:
            payload = payload.to(torch.uint8)  # gloo has no bool
        where = f"sending to stage {key.dst_stage} on rank {peer_rank}"
        group = self._group(self.rank, peer_rank)
        work = self.peer_call(
            lambda: dist.isend(payload, peer_rank, group=group, tag=key.tag(self.num_boundaries)), where
        )
        self.pending.append((work, payload, peer_rank))  # keep the payload alive until the send completes

    def post(self, keys: list[tuple[MessageKey, int, torch.Size, torch.dtype]], action: str) -> None:
        """Post the receives of a later action now, so its messages land while this rank computes."""
        if action in self.posted:
            return
        buffers, works = [], []
        for key, peer_rank, shape, dtype in keys:
            wire_dtype = torch.uint8 if dtype == torch.bool else dtype
            buffer = torch.empty(shape, dtype=wire_dtype, device=self.device)
            where = f"{action} posting its receive from stage {key.src_stage} on rank {peer_rank}"
            group = self._group(peer_rank, self.rank)
            work = self.peer_call(
                lambda b=buffer, k=key, r=peer_rank, g=group: dist.irecv(
                    b, r, group=g, tag=k.tag(self.num_boundaries)
                ),
                where,
            )
            works.append((work, peer_rank, key))
            buffers.append(buffer)
        self.posted[action] = (buffers, works)

    def try_receive(self, keys: list[tuple[MessageKey, int, torch.Size, torch.dtype]], action: str):
        self.post(keys, action)
        buffers, works = self.posted.pop(action)
        for work, peer_rank, key in works:
            self.waiting = f"{action} waiting for stage {key.src_stage} on rank {peer_rank}"
            self.peer_call(lambda w=work: w.wait(timedelta(seconds=self.timeout)), self.waiting)
        self.waiting = None
        return [b.bool() if dtype == torch.bool else b for b, (_, _, _, dtype) in zip(buffers, keys)]

    def finish_step(self) -> None:
        for work, _, peer_rank in self.pending:
            where = f"completing a send to rank {peer_rank}"
            self.peer_call(lambda w=work: w.wait(timedelta(seconds=self.timeout)), where)
        self.pending.clear()

    def _group(self, sender: int, receiver: int):
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
