"""A linear layer's band of output features, as compiled stage code calls it.

Where a cut falls inside a linear layer (``passes/divide_layers.py``), the stage before it
computes the first output features and the stage after it the rest; both hold the whole
weight, and each reads only its rows of it:

    >>> x, w, b = torch.randn(8, 32), torch.randn(64, 32), torch.randn(64)
    >>> parts = [linear_columns(x, w, b, 0, 24), linear_columns(x, w, b, 24, 64)]
    >>> torch.equal(torch.cat(parts, -1), torch.nn.functional.linear(x, w, b))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_columns(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int
) -> torch.Tensor:
    """Output features ``start`` to ``stop - 1`` of ``F.linear(x, weight, bias)``. Autograd gives
    the weight and bias gradients in those rows only (zeros elsewhere), so summing the gradients
    of the ranks that hold the pieces gives the layer's."""
    return F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])
