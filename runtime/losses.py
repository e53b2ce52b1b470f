"""The language-model loss fused with the linear layer before it, as compiled stage code calls it.

``F.cross_entropy(lm_head(x).view(-1, V), targets)`` makes the logits (tokens x vocabulary, the
largest tensor of most language models), keeps their log-softmax for backward, and walks them
again in backward. :func:`linear_cross_entropy` computes the same loss a block of rows at a
time and, where autograd will want them, the gradients of ``x``, the weight and the bias in the
same pass, while each block of logits is still in cache: no full logits tensor ever exists, and
backward only scales the saved gradients by the incoming one (the runtime's ``1 / M``).

It saves the gradients (the size of ``x`` and of the weight) instead of the log-softmax (tokens x
vocabulary), which is less memory whenever a micro-batch has more tokens than the model's width;
the compiler fuses only then (``passes/fuse_loss.py``).

    >>> x, w, t = torch.randn(6, 4), torch.randn(10, 4), torch.randint(0, 10, (6,))
    >>> fused = linear_cross_entropy(x, w, None, t)
    >>> torch.allclose(fused, torch.nn.functional.cross_entropy(x @ w.T, t))
    True
"""

from __future__ import annotations

import torch

# Logit elements per block: 4 Mi (16 MiB in float32) bounds the logits held at once. On a CPU a
# 16k vocabulary's 256-row blocks ran as fast as any size from 128 to 512 rows, and about 20%
# faster than F.cross_entropy over the whole logits with its backward.
BLOCK_ELEMENTS = 4 * 1024 * 1024


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).view(-1, V), target.view(-1), ignore_index=...)``
    (mean over the targets not ignored), without the logits tensor."""
    rows = x.reshape(-1, x.shape[-1])
    flat_target = target.reshape(-1)
    if rows.shape[0] != flat_target.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: {rows.shape[0]} rows of x but {flat_target.shape[0]} targets"
        )
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not wants_grad:
        return _loss_only(rows, weight, bias, flat_target, ignore_index)
    return _LinearCrossEntropy.apply(x, weight, bias, flat_target, ignore_index)


def _block_rows(rows: int, vocabulary: int) -> int:
    return max(1, min(rows, BLOCK_ELEMENTS // max(vocabulary, 1)))


def _block_logits(block: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, block, weight.t()) if bias is not None else block @ weight.t()


def _accumulated(dtype: torch.dtype) -> torch.dtype:
    """What the loss sums in: float32 for half precisions, as F.cross_entropy's kernels do, and the
    model's own dtype where it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def _blocks(rows, weight, bias, target, ignore_index):
    """Per block of rows: (start, stop, its log-softmax [rows, V] in float32, or float64 for a
    float64 model, its targets with the ignored ones set to 0, and minus the sum of the
    log-probabilities of the targets not ignored)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    step = _block_rows(rows.shape[0], weight.shape[0])
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        logits = _block_logits(rows[start:stop], weight, bias)
        log_probs = torch.log_softmax(logits.to(_accumulated(logits.dtype)), 1)
        picked = log_probs.gather(1, safe[start:stop, None])[:, 0]
        yield start, stop, log_probs, safe[start:stop], -torch.where(valid[start:stop], picked, 0).sum()


def _loss_only(rows, weight, bias, target, ignore_index) -> torch.Tensor:
    total = sum(block[-1] for block in _blocks(rows, weight, bias, target, ignore_index))
    return (total / (target != ignore_index).sum()).to(rows.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index):
        rows = x.reshape(-1, x.shape[-1])
        valid = target != ignore_index
        # d loss / d logits = (softmax - one_hot(target)) / count on the rows not ignored, else 0.
        count = valid.sum()
        accumulated = _accumulated(x.dtype)
        row_scale = torch.where(valid, 1.0 / count.to(accumulated), 0.0)
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=accumulated, device=x.device)
        for start, stop, log_probs, safe, loss in _blocks(rows, weight, bias, target, ignore_index):
            total = total + loss
            # The softmax, made from the log-probabilities in their own storage.
            grad_logits = log_probs.exp_()
            grad_logits[torch.arange(stop - start, device=x.device), safe] -= 1
            grad_logits = grad_logits.mul_(row_scale[start:stop, None]).to(weight.dtype)
            if grad_rows is not None:
                torch.mm(grad_logits, weight, out=grad_rows[start:stop])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), rows[start:stop])
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0))
        ctx.x_shape = x.shape
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        return (total / count).to(x.dtype)  # NaN with every target ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        grad_x = None if grad_rows is None else (grad_rows * grad_loss).reshape(ctx.x_shape)
        grad_w = None if grad_weight is None else grad_weight * grad_loss
        grad_b = None if grad_bias is None else grad_bias * grad_loss
        return grad_x, grad_w, grad_b, None, None
