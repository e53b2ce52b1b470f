"""Recomputing layers that update their buffers, as compiled stage code checkpoints them.

A BatchNorm in training normalises by the micro-batch's own statistics and updates its running
statistics in place. Run again in backward, it would update them a second time. Stage code
therefore checkpoints such a layer with ``context_fn=lambda: buffers_as_in_forward(self.bn)``: the
recomputation gets the buffers as that micro-batch's forward found them, and leaves them as they
were before it ran (later micro-batches' forwards may have updated them since):

    >>> bn = torch.nn.BatchNorm1d(3)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> y = torch.utils.checkpoint.checkpoint(
    ...     bn, x, use_reentrant=False, context_fn=lambda: buffers_as_in_forward(bn)
    ... )
    >>> after_forward = bn.running_mean.clone()
    >>> y.square().sum().backward()
    >>> torch.equal(bn.running_mean, after_forward), int(bn.num_batches_tracked)
    (True, 1)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def buffers_as_in_forward(*modules: nn.Module):
    """The (forward, recomputation) context pair ``torch.utils.checkpoint``'s ``context_fn``
    takes: the first keeps a copy of the modules' buffers as forward finds them, the second puts
    that copy in place while the recomputation runs and the buffers' values of then back after it."""
    buffers = [b for module in modules for b in module.buffers()]
    found: list[torch.Tensor] = []

    @contextmanager
    def forward():
        with torch.no_grad():
            found[:] = [b.clone() for b in buffers]
        yield

    @contextmanager
    def recomputation():
        with torch.no_grad():
            current = [b.clone() for b in buffers]
            for b, value in zip(buffers, found):
                b.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in zip(buffers, current):
                    b.copy_(value)

    return forward(), recomputation()
