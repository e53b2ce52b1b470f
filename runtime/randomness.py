"""Random numbers in a pipeline: each stage draws from a stream of its own, the data from another.

A rank's global generator is shared by everything that runs there. Left alone, two things go
wrong once a model draws (dropout):

- Every rank starts from the same seed, so the first dropout of stage 0 and the first of stage 1
  draw the same mask wherever their shapes agree: masks correlated across the model, which
  eager training never has. (Megatron-LM offsets each pipeline rank's seed for the same reason.)
- A data function that draws from the global generator on every batch, as user code often does,
  draws after that rank's dropout masks. Ranks draw different numbers of masks, so from the
  second step on, the first stage's inputs and the last stage's targets come from different batches.

So each stage's forwards run with a stream seeded from (seed, stage), swapped in around them, and
the data function draws from a stream seeded with ``seed``. Which rank runs a stage, the
transport (torchrun or in-process) and the schedule do not change what it draws: a stage runs its
micro-batches' forwards in order under every schedule. A checkpointed region's recompute restores
the state its forward stashed, which is the stage's own (``torch.utils.checkpoint`` does that).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def stage_seed(seed: int, stage: int) -> int:
    """The seed of ``stage``'s stream: well apart from every other stage's and seed's.

    >>> stage_seed(0, 1) == stage_seed(0, 1), stage_seed(0, 1) == stage_seed(1, 0)
    (True, False)
    """
    return random.Random(f"ppcompile: stage {stage} under seed {seed}").getrandbits(63)


class RandomStream:
    """A generator state of its own for the CPU and, when ``device`` is a GPU, for that GPU.

    >>> stream = RandomStream(7)
    >>> with stream.drawing():
    ...     a = torch.rand(2)
    >>> _ = torch.rand(3)  # the global generator, left where it was
    >>> with stream.drawing():
    ...     b = torch.rand(2)  # the stream goes on where it stopped
    >>> torch.equal(torch.cat([a, b]), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    True
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.gpu = None
        if self.device.type == "cuda":
            self.gpu = torch.Generator(self.device).manual_seed(seed).get_state()

    @contextmanager
    def drawing(self):
        """Within the block, random ops on the CPU (and the stream's GPU) draw from this stream."""
        outer_cpu = torch.get_rng_state()
        torch.set_rng_state(self.cpu)
        if self.gpu is not None:
            outer_gpu = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.gpu, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if self.gpu is not None:
                self.gpu = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_gpu, self.device)

    def states(self) -> list[torch.Tensor]:
        """The stream's states now, to tell whether anything drew from it."""
        return [self.cpu] + ([self.gpu] if self.gpu is not None else [])


def drawn_apart(make_source: Callable[[], Iterator], seed: int) -> Iterator:
    """``make_source()``'s items, each made with the global CPU generator swapped for a stream
    seeded with ``seed``: the same items on every rank, whatever else the rank draws between them.

    >>> def noise():
    ...     while True:
    ...         yield torch.rand(1)
    >>> quiet, busy = drawn_apart(noise, 0), drawn_apart(noise, 0)
    >>> _ = next(quiet), next(busy)
    >>> _ = torch.rand(100)  # a dropout mask between two batches, on the busy rank only
    >>> torch.equal(next(quiet), next(busy))
    True
    """
    stream = RandomStream(seed)
    with stream.drawing():
        items = iter(make_source())
    while True:
        with stream.drawing():
            try:
                item = next(items)
            except StopIteration:
                return
        yield item
