"""``ppcompile verify``: a compiled program trains exactly as the eager model does.

Runs the program under the in-process transport beside the eager model built from the same
factory and seed, on the same data, and compares per-micro-batch losses, the first step's
gradients and the parameters after every optimizer step. The bar (DESIGN.md): first-step
losses bitwise equal, everything else within ``rtol`` of the eager value (normwise: the
largest difference over the largest eager magnitude, per tensor). A program compiled with
``--fuse-loss`` sums its loss in another order, so its losses too are held to ``rtol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppcompile.runtime.loader import Program
from ppcompile.runtime.train import InProcessPipeline, batches, build_spec, make_optimizer


@dataclass(frozen=True)
class TrainingComparison:
    steps: int
    first_step_losses_equal: bool
    max_loss_difference: float  # relative, over all steps and micro-batches
    max_gradient_difference: float  # relative, first step, worst parameter
    worst_gradient: str
    max_parameter_difference: float  # relative, after the last step, worst parameter
    worst_parameter: str
    rtol: float
    bitwise_losses_expected: bool = True  # False where the program fuses its loss (--fuse-loss)

    @property
    def ok(self) -> bool:
        return (
            (self.first_step_losses_equal or not self.bitwise_losses_expected)
            and self.max_loss_difference <= self.rtol
            and self.max_gradient_difference <= self.rtol
            and self.max_parameter_difference <= self.rtol
        )

    def lines(self) -> list[str]:
        return [
            f"first-step losses bitwise equal: {self.first_step_losses_equal}"
            + (
                ""
                if self.bitwise_losses_expected
                else " (not required: the loss is fused, its sums run in another order)"
            ),
            f"largest loss difference over {self.steps} steps: {self.max_loss_difference:.2e} (rtol {self.rtol:g})",
            f"largest gradient difference, step 1: {self.max_gradient_difference:.2e} ({self.worst_gradient})",
            f"largest parameter difference after step {self.steps}: {self.max_parameter_difference:.2e} "
            f"({self.worst_parameter})",
        ]


# A gradient is compared relative to its own largest entry, but never to less than this share of
# the model's largest gradient entry. A gradient that is zero in exact arithmetic (a bias that
# BatchNorm's mean subtraction cancels) comes out as rounding noise of either sign, ~1e-9 where
# its neighbours are ~1e-1; two correct runs that sum in another order (one thread against
# two) disagree on it completely. Under rtol 1e-5 this floor lets through differences up to
# about float32's epsilon times the model's gradient scale, and nothing larger.
GRADIENT_SCALE_FLOOR = 1e-2


def relative_difference(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference over ``expected``'s largest entry (or ``floor``, where that is larger)."""
    scale = max(expected.abs().max().item(), floor)
    diff = (actual.to(expected.dtype) - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def eager_run(program: Program, steps: int, optimizer: str, lr: float, seed: int, device: str = "cpu"):
    """(losses per step, first-step gradients, final parameters) of the single-process eager model."""
    spec = build_spec(program, seed)
    model = spec.module.to(device)  # built on the CPU, as the pipeline's ranks are: the same weights
    opt = make_optimizer(optimizer, list(model.parameters()), lr)
    names = [i["name"] for i in program.data["inputs"]]
    data = batches(program, spec, seed)
    losses, grads = [], {}
    for step in range(steps):
        microbatches = next(data)
        opt.zero_grad(set_to_none=True)
        step_losses = []
        for mb in microbatches:
            loss = model(*(mb[n].to(device) for n in names))
            (loss / len(microbatches)).backward()
            step_losses.append(float(loss.detach()))
        if step == 0:
            grads = {
                n: p.grad.cpu().clone()
                for n, p in model.named_parameters(remove_duplicate=False)
                if p.grad is not None
            }
        opt.step()
        losses.append(step_losses)
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return losses, grads, params


def compare(
    losses: list[list[float]],
    grads: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    reference: tuple,
    rtol: float = 1e-5,
    bitwise_losses_expected: bool = True,
) -> TrainingComparison:
    ref_losses, ref_grads, ref_params = reference
    loss_diff = max(
        abs(a - b) / max(abs(b), 1e-30) for got, want in zip(losses, ref_losses) for a, b in zip(got, want)
    )
    largest = max(
        (g.abs().max().item() for g in ref_grads.values() if g is not None and g.numel()), default=0.0
    )
    floor = GRADIENT_SCALE_FLOOR * largest
    grad_diffs = {n: relative_difference(g, ref_grads[n], floor) for n, g in grads.items() if g is not None}
    param_diffs = {n: relative_difference(p, ref_params[n]) for n, p in params.items()}
    worst_grad = max(grad_diffs, key=grad_diffs.get)
    worst_param = max(param_diffs, key=param_diffs.get)
    return TrainingComparison(
        steps=len(losses),
        first_step_losses_equal=losses[0] == ref_losses[0],
        max_loss_difference=loss_diff,
        max_gradient_difference=grad_diffs[worst_grad],
        worst_gradient=worst_grad,
        max_parameter_difference=param_diffs[worst_param],
        worst_parameter=worst_param,
        rtol=rtol,
        bitwise_losses_expected=bitwise_losses_expected,
    )


def verify_in_process(
    program: Program,
    steps: int = 3,
    optimizer: str = "sgd",
    lr: float = 1e-2,
    seed: int = 0,
    rtol: float = 1e-5,
    device: str = "cpu",
) -> TrainingComparison:
    """Train ``program`` for ``steps`` steps on the in-process transport, every rank on ``device``,
    and compare it with the eager model trained there too (see :func:`compare`)."""
    pipeline = InProcessPipeline(program, seed=seed, optimizer=optimizer, lr=lr, device=device)
    data = batches(program, pipeline.spec, seed)
    losses, grads = [], {}
    for step in range(steps):
        losses.append(pipeline.step(next(data)))
        if step == 0:
            grads = {n: g.cpu().clone() for n, g in pipeline.named_gradients().items() if g is not None}
    params = {n: p.detach().cpu().clone() for n, p in pipeline.named_parameters().items()}
    reference = eager_run(program, steps, optimizer, lr, seed, device)
    return compare(losses, grads, params, reference, rtol, not program.data.get("fused_losses"))
