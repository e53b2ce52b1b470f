"""``ppcompile verify``: a compiled program trains exactly as the eager model does.

Runs the program under the in-process transport beside the eager model built from the same
factory and seed, on the same data, and compares per-micro-batch losses, the first step's
gradients, and the parameters and buffers after the last optimizer step. The bar (DESIGN.md):
first-step losses bitwise equal, everything else within ``rtol`` of the eager value (normwise:
the largest difference over the largest eager magnitude, per tensor), integer buffers (a
BatchNorm's step count) equal. A program compiled with ``--fuse-loss`` sums its loss in another
order, so its losses too are held to ``rtol``.

Random numbers: each stage draws from a stream of its own (``ppcompile.runtime.randomness``), the
eager model from one generator, so a stage's dropout mask is not the eager model's mask.
Both runs therefore take place with dropout switched off (p = 0, the identity), and say so. Any
other random draw (``torch.rand``, ``bernoulli``) cannot be switched off soundly; verify notices
it by a stage's stream moving during training and names it beside a failure.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import rnn as rnn_modules

from ppcompile.runtime.loader import Program
from ppcompile.runtime.outputs import as_returned, output_leaves
from ppcompile.runtime.spec import ModelSpec, call_forward, loss_of
from ppcompile.runtime.stage import plain_tensor_attributes
from ppcompile.runtime.train import InProcessPipeline, batches, build_spec, make_optimizer


def random_ops_lines(switched_off: tuple[str, ...], left_on: tuple[str, ...]) -> list[str]:
    """What verify says first about the random numbers a model draws."""
    lines = []
    if switched_off:
        lines.append(
            f"the model draws random numbers ({'; '.join(switched_off)}): compared with "
            "them switched off on both sides, since each stage draws from a stream of its own, not eager's"
        )
    if left_on:
        lines.append(
            f"the model draws random numbers verify cannot switch off ({'; '.join(left_on)}): "
            "each stage draws them from a stream of its own, not eager's"
        )
    return lines


def failed_verdict(left_on: tuple[str, ...]) -> str:
    if left_on:
        return (
            "FAILED: outside the bar; the difference may come from the random numbers the model draws "
            f"({'; '.join(left_on)}), which each stage draws from a stream of its own, not eager's"
        )
    return "FAILED: outside the bar"


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
    # After the last step, worst buffer: relative for a float buffer, absolute for an integer one.
    max_buffer_difference: float = 0.0
    worst_buffer: str | None = None  # None: no buffers were compared
    worst_buffer_is_integer: bool = False  # an integer buffer must be equal, not within rtol
    random_ops_switched_off: tuple[str, ...] = ()  # dropout both runs took with p = 0, by place
    random_ops_left_on: tuple[str, ...] = ()  # random draws both runs made, each in its own order
    precision: torch.dtype | None = None  # a low-precision dtype of the model's that set rtol, if one did
    # Entries an adaptive optimizer moved by the sign of a rounding-noise gradient, which differ
    # between the runs (see NoiseHeld): how many did in some step, and the most they did in one
    # step, in optimizer steps (NOISE_STEP); two at most, one each way.
    noisy_entries: int = 0
    noise_steps_apart: float = 0.0
    # Where the eager model's own training left finite numbers ("its loss is nan at step 3"), if it
    # did: the comparison then holds nothing to a bar.
    eager_diverged: str = ""

    @property
    def buffers_agree(self) -> bool:
        allowed = 0.0 if self.worst_buffer_is_integer else self.rtol
        return self.worst_buffer is None or self.max_buffer_difference <= allowed

    @property
    def ok(self) -> bool:
        return (
            not self.eager_diverged
            and (self.first_step_losses_equal or not self.bitwise_losses_expected)
            and self.max_loss_difference <= self.rtol
            and self.max_gradient_difference <= self.rtol
            and self.max_parameter_difference <= self.rtol
            and self.noise_steps_apart <= 2.0
            and self.buffers_agree
        )

    def lines(self) -> list[str]:
        lines = random_ops_lines(self.random_ops_switched_off, self.random_ops_left_on)
        if self.eager_diverged:
            lines.append(
                f"the eager model itself diverges: {self.eager_diverged}, so there is nothing sound to "
                "compare against; verify where eager trains (a lower --lr, parameters in float32)"
            )
        if self.precision is not None:
            lines.append(
                f"rtol {self.rtol:.2e}: two epsilons of {str(self.precision).removeprefix('torch.')}, the lowest "
                "precision the model computes in (float32's bar, 1e-05, holds float32 models)"
            )
        lines += [
            f"first-step losses bitwise equal: {self.first_step_losses_equal}"
            + (
                ""
                if self.bitwise_losses_expected
                else " (not required: the loss is fused, its sums run in another order)"
            ),
            f"largest loss difference over {self.steps} steps: {self.max_loss_difference:.2e} (rtol {self.rtol:g})",
            f"largest gradient difference, step 1: {self.max_gradient_difference:.2e} ({self.worst_gradient})",
            f"largest parameter difference after step {self.steps}: {self.max_parameter_difference:.2e} "
            f"({self.worst_parameter})"
            + (
                f"; {self.noisy_entries} entries whose gradient is rounding noise, which the optimizer moves "
                f"by its sign: at most {self.noise_steps_apart:.2f} of its steps apart in a step (2 allowed), "
                "then set equal"
                if self.noisy_entries
                else ""
            ),
        ]
        if self.worst_buffer is not None:
            if self.worst_buffer_is_integer and not self.buffers_agree:
                difference, note = f"{self.max_buffer_difference:g}", ", an integer buffer: must be equal"
            else:
                difference, note = f"{self.max_buffer_difference:.2e}", ""
            lines.append(
                f"largest buffer difference after step {self.steps}: {difference} ({self.worst_buffer}{note})"
            )
        return lines

    def verdict(self) -> str:
        if self.ok:
            return "OK: the compiled program trains as the eager model"
        if self.eager_diverged:
            return "FAILED: the eager model itself diverges, so the program cannot be held to it"
        return failed_verdict(self.random_ops_left_on)


# A gradient is compared relative to its own largest entry, but never to less than this share of
# the model's largest gradient entry. A gradient that is zero in exact arithmetic (a bias that
# BatchNorm's mean subtraction cancels) comes out as rounding noise of either sign, ~1e-9 where
# its neighbours are ~1e-1; two correct runs that sum in another order (one thread against
# two, a linear layer divided across a cut summing its input's gradient band by band) disagree
# on it completely. Under rtol 1e-5 this floor lets through differences up to about eight
# float32 epsilons (1e-6) of the model's gradient scale, and nothing larger: a divided layer in
# tests/fixtures/unseen_norm_blocks.py:mixed at K=4 leaves 1.4e-7 of it on such a bias.
# A parameter is compared the same way against the model's largest update over the steps: where
# such a bias starts at zero (nn.MultiheadAttention's output bias before a BatchNorm), it holds
# nothing but its noisy updates.
GRADIENT_SCALE_FLOOR = 1e-1
# An adaptive optimizer divides a gradient by its own running size, so an entry whose gradient is
# rounding noise (nn.MultiheadAttention's key bias, which softmax cancels exactly: 4e-10 where the
# model's largest is 1e-1) moves a full step of the noise's sign, differently in any two correct
# runs; whatever reads it then differs too (the running mean of a BatchNorm after that bias, and
# at the next step the loss), by far more than rounding. Entries whose first-step gradient in
# eager is below this share of the model's largest are held, per step, to the most two such steps
# can put them apart: the learning rate times NOISE_STEP each way (Adam's first step moves
# lr x g / |g|, later ones at most about 3.2 lr at PyTorch's betas; RMSprop's first,
# lr x g / sqrt(0.01 g^2), 10 lr; Adagrad's lr); then eager's are set to the pipeline's, so the
# next step starts both from the same numbers and everything else is held to the bar (NoiseHeld).
# A model held to a coarser bar (bfloat16's) has its share scaled with it: rounding noise there is
# bfloat16's.
NOISE_GRADIENT_SHARE = 1e-6
NOISE_STEP = {"adam": 3.2, "adamw": 3.2, "rmsprop": 10.0, "adagrad": 1.0}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference over ``expected``'s largest finite entry (or ``floor``, where that is
    larger). Equal entries differ by nothing, NaN and an infinity included; a NaN or infinity
    where the other holds something else is infinitely far, so it can never hide behind a finite
    difference (Python's ``max`` passes over a NaN unless it comes first).

    >>> relative_difference(torch.tensor([1.0, float("nan")]), torch.tensor([2.0, float("nan")]))
    0.5
    >>> relative_difference(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 3.0]))
    inf
    """
    actual = actual.to(expected.dtype)
    scale = max(expected.nan_to_num(0.0, 0.0, 0.0).abs().max().item(), floor)
    difference = (actual - expected).abs()
    if not is_integer(expected):
        same = (actual == expected) | (actual.isnan() & expected.isnan())
        difference = torch.where(same, 0.0, difference.nan_to_num(math.inf))
    diff = difference.max().item()
    return diff / scale if scale > 0 else diff


def loss_difference(actual: float, expected: float) -> float:
    """One loss's difference relative to eager's, as :func:`relative_difference` counts it."""
    if actual == expected or (math.isnan(actual) and math.isnan(expected)):
        return 0.0
    difference = abs(actual - expected) / max(abs(expected), 1e-30)
    return math.inf if math.isnan(difference) else difference


def _bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same shape and entries, NaN where the other holds NaN."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    same = actual == expected
    if not is_integer(expected):
        same |= actual.isnan() & expected.isnan()
    return bool(same.all())


def is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


def buffer_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """A float buffer's :func:`relative_difference`; an integer or bool buffer's largest absolute
    difference (a step count off by one is off, however large the count)."""
    if actual.shape != expected.shape:
        return float("inf")
    if not is_integer(expected):
        return relative_difference(actual, expected) if expected.numel() else 0.0
    if torch.equal(actual.to(expected.dtype), expected):
        return 0.0
    return float((actual.long() - expected.long()).abs().max().item())


def rng_states(device: str | torch.device) -> list[torch.Tensor]:
    """The states of the generators a random op running on ``device`` draws from."""
    states = [torch.get_rng_state()]
    if torch.device(device).type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))


# The dropout functions an nn.Dropout* module calls and stage code calls by name (the compiler
# inlines a functional dropout's p, so setting modules' p to 0 would miss those).
DROPOUT_FUNCTIONS = (
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
)
SWITCHED_OFF_CALLS = frozenset(f"torch.nn.functional.{name}" for name in DROPOUT_FUNCTIONS)
# Calls (by their last name) that draw from the generator in training; verify cannot make these draw
# what the eager model draws. A method such as ``x.bernoulli_(p)`` counts too.
RANDOM_CALLS = frozenset(
    {
        *DROPOUT_FUNCTIONS,
        "feature_dropout",
        "native_dropout",
        "bernoulli",
        "bernoulli_",
        "rand",
        "rand_like",
        "randn",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "multinomial",
        "normal",
        "normal_",
        "poisson",
        "uniform_",
        "exponential_",
        "geometric_",
        "cauchy_",
        "log_normal_",
        "random_",
        "rrelu",
        "rrelu_",
        "gumbel_softmax",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
    }
)
CALL = re.compile(r"([A-Za-z_][\w.]*)\(")
# A stage's attention call that drops weights: its dropout_p is inlined, as a functional dropout's p is.
ATTENTION_DROPOUT = re.compile(r"([\w.]*scaled_dot_product_attention)\(.*dropout_p=(?!0\.0\b)[0-9.]+")


def _with_p_zero(dropout: Callable, dropped: list[str]) -> Callable:
    """``dropout`` with its probability 0 (it returns its input and draws nothing), noting in
    ``dropped`` every call that would have dropped."""
    signature = inspect.signature(dropout)

    def switched_off(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["p"] > 0 and bound.arguments["training"]:
            dropped.append(dropout.__name__)
        bound.arguments["p"] = 0.0
        return dropout(*bound.args, **bound.kwargs)

    return switched_off


def _attention_without_dropout(attention: Callable, dropped: list[str]) -> Callable:
    """``scaled_dot_product_attention`` with its ``dropout_p`` 0, noting in ``dropped`` every call
    that would have dropped attention weights."""

    def switched_off(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if dropout_p > 0:
            dropped.append("scaled_dot_product_attention")
        return attention(query, key, value, attn_mask, 0.0, is_causal, **kwargs)

    return switched_off


# Where scaled_dot_product_attention is called from: nn.MultiheadAttention (inside
# F.multi_head_attention_forward, as nn.TransformerEncoderLayer calls it) and models by F's name,
# stage code by the builtin's.
ATTENTION_HOMES = (F, torch._C._nn)

# The kernels nn.LSTM, nn.GRU and nn.RNN call through torch.nn.modules.rnn's ``_VF``, which drop
# between stacked layers themselves (``dropout=`` with ``num_layers`` > 1), not through F.dropout.
RECURRENT_KERNELS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


class _RecurrentWithoutDropout:
    """torch's ``_VF`` as ``torch.nn.modules.rnn`` calls it, its recurrent kernels with dropout 0,
    noting in ``dropped`` every call that would have dropped. The kernels take dropout just before
    the training flag: ``(input, hx, params, has_biases, num_layers, dropout, train, ...)``, or with
    ``batch_sizes`` after the input for a packed sequence."""

    def __init__(self, vf, dropped: list[str]):
        self._vf, self._dropped = vf, dropped

    def __getattr__(self, name: str):
        found = getattr(self._vf, name)
        if name not in RECURRENT_KERNELS:
            return found

        def switched_off(*args):
            at = 5 if isinstance(args[3], bool) else 6  # args[3]: has_biases, or a packed call's params
            if args[at] > 0 and args[at + 1]:
                self._dropped.append(f"nn.{name.split('_')[0].upper()}")
            return found(*args[:at], 0.0, *args[at + 1 :])

        return switched_off


@contextmanager
def dropout_switched_off() -> Iterator[list[str]]:
    """Within, every ``torch.nn.functional`` dropout runs with p = 0, scaled dot-product attention
    with ``dropout_p`` 0, and nn.LSTM, nn.GRU and nn.RNN without dropout between their layers, for
    modules and stage code alike; yields the list of calls that
    would have dropped. Restored on the way out."""
    dropped: list[str] = []
    # (where, name, what replaces it while inside)
    patches = [(F, name, _with_p_zero(getattr(F, name), dropped)) for name in DROPOUT_FUNCTIONS] + [
        (
            home,
            "scaled_dot_product_attention",
            _attention_without_dropout(home.scaled_dot_product_attention, dropped),
        )
        for home in ATTENTION_HOMES
    ]
    patches.append((rnn_modules, "_VF", _RecurrentWithoutDropout(rnn_modules._VF, dropped)))
    originals = [(home, name, getattr(home, name)) for home, name, _ in patches]
    try:
        for home, name, switched_off in patches:
            setattr(home, name, switched_off)
        yield dropped
    finally:
        for home, name, original in originals:
            setattr(home, name, original)


def _first_few(places: list[str], shown: int = 3) -> str:
    rest = len(places) - shown
    return ", ".join(places[:shown]) + (f" and {rest} more" if rest > 0 else "")


def random_ops(program: Program, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the dropout verify switches off, the other random ops), each as "what in where", from the
    model's modules and the calls in the program's stage files."""
    switched: dict[str, list[str]] = {}  # module class or call: where
    left: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            switched.setdefault(type(module).__name__, []).append(name)
        elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0 and module.training:
            switched.setdefault(type(module).__name__, []).append(name)
        elif (
            isinstance(module, nn.RNNBase)
            and module.dropout > 0
            and module.num_layers > 1
            and module.training
        ):
            switched.setdefault(type(module).__name__, []).append(name)
        elif isinstance(module, nn.RReLU) and module.training:
            left.setdefault(type(module).__name__, []).append(name)
    stages_calling: dict[str, list[str]] = {}
    for stage in program.data["stages"]:
        code = (program.root / stage["file"]).read_text()
        for call in dict.fromkeys(CALL.findall(code)):
            # ``self.blocks[0].drop(x)`` calls a module, found above by its class.
            if not call.startswith("self.") and call.rpartition(".")[2] in RANDOM_CALLS:
                stages_calling.setdefault(call, []).append(str(stage["id"]))
        for call in dict.fromkeys(ATTENTION_DROPOUT.findall(code)):
            stages_calling.setdefault(call, []).append(str(stage["id"]))
    for call, stages in stages_calling.items():
        where = f"stage{'s' if len(stages) > 1 else ''} {', '.join(stages)}"
        switched_off = call in SWITCHED_OFF_CALLS or call.endswith("scaled_dot_product_attention")
        (switched if switched_off else left)[call] = [where]
    return (
        tuple(f"{what} in {_first_few(where)}" for what, where in switched.items()),
        tuple(f"{what} in {_first_few(where)}" for what, where in left.items()),
    )


@dataclass(frozen=True)
class EagerTraining:
    losses: list[list[float]]  # per step, per micro-batch
    gradients: dict[str, torch.Tensor]  # first step
    parameters: dict[str, torch.Tensor]  # after the last step
    buffers: dict[str, torch.Tensor]  # after the last step
    drew_random_numbers: bool  # the generator moved during a step
    initial_parameters: dict[str, torch.Tensor] | None = None  # before the first step


def eager_training(
    program: Program,
    steps: int,
    optimizer: str,
    lr: float,
    seed: int,
    device: str = "cpu",
    spec: ModelSpec | None = None,
    after_step: Callable[[int, nn.Module], None] | None = None,
) -> EagerTraining:
    """The single-process eager model trained for ``steps`` steps on the program's data; ``spec``:
    the model as ``build_spec`` makes it, where it was built already; ``after_step(step, model)``
    is called after each optimizer step, its gradients still in place (see :class:`NoiseHeld`)."""
    if spec is None:
        spec = build_spec(program, seed)
    model = spec.module.to(device)  # built on the CPU, as the pipeline's ranks are: the same weights
    opt = make_optimizer(optimizer, list(model.parameters()), lr)
    names = [i["name"] for i in program.data["inputs"]]
    data = batches(program, spec, seed)
    losses, grads, drew = [], {}, False
    initial = {n: p.detach().cpu().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    for step in range(steps):
        microbatches = next(data)
        opt.zero_grad(set_to_none=True)
        step_losses = []
        before = rng_states(device)
        for mb in microbatches:
            loss = loss_of(
                call_forward(
                    model, names, [mb[n].to(device) for n in names], spec.input_groups, spec.none_inputs
                )
            )
            (loss / len(microbatches)).backward()
            step_losses.append(float(loss.detach()))
        drew |= moved(before, rng_states(device))
        if step == 0:
            grads = {
                n: p.grad.cpu().clone()
                for n, p in model.named_parameters(remove_duplicate=False)
                if p.grad is not None
            }
        opt.step()
        if after_step is not None:
            after_step(step, model)
        losses.append(step_losses)
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: b.detach().cpu().clone() for n, b in buffers_and_plain_tensors(model).items()}
    return EagerTraining(losses, grads, params, buffers, drew, initial)


def buffers_and_plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers and plain tensor attributes (``self.mask = torch.tril(...)``), by name:
    what its stages hold besides parameters, as buffers."""
    held = dict(model.named_buffers(remove_duplicate=False))
    for path, module in model.named_modules(remove_duplicate=False):
        for name, value in plain_tensor_attributes(module):
            held[f"{path}.{name}" if path else name] = value
    return held


def eager_run(program: Program, steps: int, optimizer: str, lr: float, seed: int, device: str = "cpu"):
    """(losses per step, first-step gradients, final parameters) of the single-process eager model."""
    eager = eager_training(program, steps, optimizer, lr, seed, device)
    return eager.losses, eager.gradients, eager.parameters


def compare(
    losses: list[list[float]],
    grads: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    reference: tuple,
    rtol: float = 1e-5,
    bitwise_losses_expected: bool = True,
    buffers: dict[str, dict[int, torch.Tensor]] | None = None,
    reference_buffers: dict[str, torch.Tensor] | None = None,
    initial_parameters: dict[str, torch.Tensor] | None = None,
) -> TrainingComparison:
    """``buffers``: every buffer the ranks hold, by name then rank (a buffer two ranks read has a copy
    on each, and each must match), against ``reference_buffers``, the eager model's by name.
    ``initial_parameters``, the parameters before training, set the scale of the updates, which a
    parameter made of nothing else is compared against (see ``GRADIENT_SCALE_FLOOR``)."""
    ref_losses, ref_grads, ref_params = reference
    # nn.Embedding(sparse=True) gives sparse gradients, which have no max(): compared dense.
    ref_grads = {n: g.to_dense() if g is not None and g.is_sparse else g for n, g in ref_grads.items()}
    grads = {n: g.to_dense() if g is not None and g.is_sparse else g for n, g in grads.items()}
    loss_diff = max(loss_difference(a, b) for got, want in zip(losses, ref_losses) for a, b in zip(got, want))
    largest = max(
        (g.abs().max().item() for g in ref_grads.values() if g is not None and g.numel()), default=0.0
    )
    floor = GRADIENT_SCALE_FLOOR * largest
    # A gradient the eager model has none for (a parameter it uses under no_grad) counts against zero.
    grad_diffs = {
        n: relative_difference(
            g, ref_grads[n] if ref_grads.get(n) is not None else torch.zeros_like(g), floor
        )
        for n, g in grads.items()
        if g is not None
    }
    # A zero-initialised bias whose gradient a normalisation cancels holds only its updates, which
    # are rounding noise: compared, as such a gradient is, against a share of the model's largest.
    largest_update = max(
        (
            (ref_params[n] - initial_parameters[n]).abs().max().item()
            for n in ref_params
            if initial_parameters and n in initial_parameters and ref_params[n].numel()
        ),
        default=0.0,
    )
    param_diffs = {
        n: relative_difference(p, ref_params[n], GRADIENT_SCALE_FLOOR * largest_update)
        for n, p in params.items()
    }
    # A model with nothing to train (every parameter frozen) has no gradient or parameter to compare.
    worst_grad = max(grad_diffs, key=grad_diffs.get, default="(none)")
    worst_param = max(param_diffs, key=param_diffs.get, default="(none)")
    buffer_fields = {}
    if buffers and reference_buffers is not None:
        buffer_fields = _worst_buffer(buffers, reference_buffers, rtol)
    return TrainingComparison(
        steps=len(losses),
        eager_diverged=_where_diverged(ref_losses, ref_params),
        first_step_losses_equal=losses[0] == ref_losses[0],
        max_loss_difference=loss_diff,
        max_gradient_difference=grad_diffs.get(worst_grad, 0.0),
        worst_gradient=worst_grad,
        max_parameter_difference=param_diffs.get(worst_param, 0.0),
        worst_parameter=worst_param,
        rtol=rtol,
        bitwise_losses_expected=bitwise_losses_expected,
        **buffer_fields,
    )


def _where_diverged(losses: list[list[float]], params: dict[str, torch.Tensor]) -> str:
    """Where a training run's numbers stopped being finite, or "" if they never did.

    >>> _where_diverged([[1.0, 2.0], [1.5, float("nan")]], {})
    'its loss is nan at step 2 (micro-batch 2)'
    """
    for step, step_losses in enumerate(losses, 1):
        for microbatch, loss in enumerate(step_losses, 1):
            if not math.isfinite(loss):
                return f"its loss is {loss} at step {step} (micro-batch {microbatch})"
    for name, p in params.items():
        if p.is_floating_point() and not bool(p.isfinite().all()):
            return f"its parameter {name} is not finite after step {len(losses)}"
    return ""


class NoiseHeld:
    """An ``eager_training`` ``after_step`` that holds the entries whose gradient is rounding noise
    (see ``NOISE_GRADIENT_SHARE``) to the pipeline's: after each eager step, it measures how far
    each such entry is from the pipeline's after the same step, in optimizer steps, then sets it to
    the pipeline's, so that what reads it in the next step reads the same numbers in both runs.

    ``pipeline_steps``: the pipeline's parameters after each step, by name; ``step_size``: the most
    one optimizer step moves such an entry (the learning rate times NOISE_STEP).
    """

    def __init__(
        self,
        pipeline_steps: list[dict[str, torch.Tensor]],
        step_size: float,
        share: float = NOISE_GRADIENT_SHARE,
    ):
        self.pipeline_steps = pipeline_steps
        self.step_size = step_size
        self.share = share  # of the largest gradient: below it, an entry's gradient is noise
        self.masks: dict[str, torch.Tensor] = {}
        self.apart: dict[str, torch.Tensor] = {}  # per name, the entries that differed in some step
        self.steps_apart = 0.0

    def __call__(self, step: int, model: nn.Module) -> None:
        named = dict(model.named_parameters(remove_duplicate=False))
        if step == 0:  # the first step's gradients are still in place
            largest = max(
                (p.grad.abs().max().item() for p in named.values() if _has_gradient(p)), default=0.0
            )
            seen = set()  # a tied parameter is held once, under its first name
            for n, p in named.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if _has_gradient(p) and n in self.pipeline_steps[0] and largest > 0:
                    mask = p.grad.abs() < self.share * largest
                    if bool(mask.any()):
                        self.masks[n] = mask
        with torch.no_grad():
            for n, mask in self.masks.items():
                p, theirs = named[n], self.pipeline_steps[step][n].to(named[n].device, named[n].dtype)
                difference = (p - theirs).abs().where(mask, 0.0)
                self.steps_apart = max(self.steps_apart, difference.max().item() / self.step_size)
                self.apart[n] = self.apart.get(n, torch.zeros_like(mask)) | (difference > 0)
                p.copy_(torch.where(mask, theirs, p))

    @property
    def entries(self) -> int:
        """How many entries differed between the runs in some step."""
        return int(sum(int(a.sum()) for a in self.apart.values()))


def _has_gradient(p: torch.Tensor) -> bool:
    return p.grad is not None and p.grad.numel() > 0 and not p.grad.is_sparse


def _worst_buffer(
    buffers: dict[str, dict[int, torch.Tensor]], reference: dict[str, torch.Tensor], rtol: float
) -> dict:
    """The TrainingComparison fields of the worst buffer copy: one outside the bar before any inside."""
    worst = None
    for name, copies in buffers.items():
        expected = reference[name]
        for rank, actual in copies.items():
            difference = buffer_difference(actual, expected)
            outside = difference > (0.0 if is_integer(expected) else rtol)
            label = name if len(copies) == 1 else f"{name} on rank {rank}"
            if worst is None or (outside, difference) > worst[0]:
                worst = ((outside, difference), label, is_integer(expected))
    (_, difference), label, integer = worst
    return {"max_buffer_difference": difference, "worst_buffer": label, "worst_buffer_is_integer": integer}


FLOAT32_RTOL = 1e-5


def precision_rtol(dtypes) -> tuple[float, torch.dtype | None]:
    """The bar's rtol for a model whose floating values have these dtypes, and the dtype that set
    it (None: float32's). A model held in bfloat16 or float16 rounds every sum to its own
    precision, so two correct runs that add in another order (a tied parameter's gradient summed
    per stage, then across stages) differ by about its epsilon: the bar is two of them there.

    >>> precision_rtol([torch.float32, torch.bfloat16])
    (0.015625, torch.bfloat16)
    >>> precision_rtol([torch.float32, torch.int64])
    (1e-05, None)
    """
    floating = [d for d in dtypes if d.is_floating_point]
    coarsest = max(floating, key=lambda d: torch.finfo(d).eps, default=torch.float32)
    rtol = 2 * torch.finfo(coarsest).eps
    return (rtol, coarsest) if rtol > FLOAT32_RTOL else (FLOAT32_RTOL, None)


# ``with torch.autocast("cpu", dtype=torch.bfloat16):`` as stage files write a model's region.
AUTOCAST_REGION = re.compile(r'torch\.autocast\("\w+", dtype=torch\.(\w+)\b(?!, enabled=False)')


def computed_dtypes(program: Program, parameters) -> set[torch.dtype]:
    """The dtypes the program computes in: its parameters', and those its stages' autocast regions
    compute in. A float32 model run under bfloat16 autocast sums in bfloat16, so two correct runs
    that add a float32 gradient in another order can round a bfloat16 value an ulp apart."""
    dtypes = {p.dtype for p in parameters}
    for stage in program.data["stages"]:
        code = (program.root / stage["file"]).read_text()
        dtypes |= {getattr(torch, name) for name in AUTOCAST_REGION.findall(code)}
    return dtypes


def verify_in_process(
    program: Program,
    steps: int = 3,
    optimizer: str = "sgd",
    lr: float = 1e-2,
    seed: int = 0,
    rtol: float | None = None,
    device: str = "cpu",
) -> TrainingComparison:
    """Train ``program`` for ``steps`` steps on the in-process transport, every rank on ``device``,
    and compare it with the eager model trained there too (see :func:`compare`), both with dropout
    switched off (see the module's docstring). ``rtol`` None: 1e-5, or for a model with
    parameters in lower precision, :func:`precision_rtol`'s."""
    # Built before dropout is switched off: a factory that runs its model (to warm BatchNorm's
    # statistics) runs it as written, and its dropout is not the forward's.
    pipeline = InProcessPipeline(program, seed=seed, optimizer=optimizer, lr=lr, device=device)
    reference = build_spec(program, seed)
    with dropout_switched_off() as dropped:
        precision = None
        if rtol is None:
            rtol, precision = precision_rtol(computed_dtypes(program, pipeline.named_parameters().values()))
        data = batches(program, pipeline.spec, seed)
        # Every step's parameters where NoiseHeld sets eager's noise entries to them, else the last's.
        holds_noise = optimizer in NOISE_STEP
        losses, grads, drew, stepped = [], {}, False, []
        for step in range(steps):
            microbatches = next(data)
            before = pipeline.random_states()
            losses.append(pipeline.step(microbatches))
            drew |= moved(before, pipeline.random_states())
            if step == 0:
                grads = {n: g.cpu().clone() for n, g in pipeline.named_gradients().items() if g is not None}
            if holds_noise or step == steps - 1:
                stepped.append({n: p.detach().cpu().clone() for n, p in pipeline.named_parameters().items()})
        params = stepped[-1]
        buffers = {
            n: {rank: b.detach().cpu().clone() for rank, b in copies.items()}
            for n, copies in pipeline.named_buffers().items()
        }
        # A model computing in bfloat16 rounds a cancelled gradient to its own epsilon's share.
        share = NOISE_GRADIENT_SHARE * rtol / FLOAT32_RTOL
        noise = NoiseHeld(stepped, lr * NOISE_STEP[optimizer], share) if holds_noise else None
        eager = eager_training(program, steps, optimizer, lr, seed, device, reference, noise)
    result = compare(
        losses,
        grads,
        params,
        (eager.losses, eager.gradients, eager.parameters),
        rtol,
        not program.data.get("fused_losses"),
        buffers,
        eager.buffers,
        eager.initial_parameters,
    )
    switched_off, left_on = random_ops(program, pipeline.spec.module)
    return replace(
        result,
        noisy_entries=noise.entries if noise else 0,
        noise_steps_apart=noise.steps_apart if noise else 0.0,
        precision=precision,
        random_ops_switched_off=(switched_off or ("dropout called where verify cannot place it",))
        if dropped
        else (),
        random_ops_left_on=(left_on or ("an op verify cannot name",))
        if drew or eager.drew_random_numbers
        else (),
    )


@dataclass(frozen=True)
class InferenceComparison:
    """An inference program's outputs against the eager model's forward, micro-batch by micro-batch."""

    steps: int
    outputs_bitwise_equal: bool
    max_output_difference: float  # relative, over every step, micro-batch and returned tensor
    worst_output: str  # its path, ``output['logits']``
    rtol: float
    max_buffer_difference: float = 0.0
    worst_buffer: str | None = None
    worst_buffer_is_integer: bool = False
    random_ops_switched_off: tuple[str, ...] = ()
    random_ops_left_on: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        allowed = 0.0 if self.worst_buffer_is_integer else self.rtol
        buffers_agree = self.worst_buffer is None or self.max_buffer_difference <= allowed
        return self.max_output_difference <= self.rtol and buffers_agree

    def lines(self) -> list[str]:
        lines = random_ops_lines(self.random_ops_switched_off, self.random_ops_left_on)
        lines += [
            f"outputs bitwise equal over {self.steps} steps: {self.outputs_bitwise_equal}",
            f"largest output difference: {self.max_output_difference:.2e} ({self.worst_output}; rtol {self.rtol:g})",
        ]
        if self.worst_buffer is not None:
            lines.append(
                f"largest buffer difference after step {self.steps}: {self.max_buffer_difference:.2e} "
                f"({self.worst_buffer})"
            )
        return lines

    def verdict(self) -> str:
        if self.ok:
            return "OK: the compiled program computes the eager model's forward"
        return failed_verdict(self.random_ops_left_on)


def _output_differences(got, expected) -> tuple[bool, dict[str, float]]:
    """(every leaf bitwise equal, each leaf's relative difference by path) of two outputs."""
    equal, differences = True, {}
    expected_leaves = dict(output_leaves(as_returned(expected)))
    for path, value in output_leaves(got):
        want = expected_leaves.get(path)
        if isinstance(want, torch.Tensor) and isinstance(value, torch.Tensor):
            same = _bitwise_equal(value.cpu(), want.cpu())
            if not same and value.shape == want.shape and want.numel():
                difference = buffer_difference(value.cpu(), want.cpu())
            else:
                difference = 0.0 if same else float("inf")
        else:  # a size, a constant; or a tensor where the other holds none
            same = (
                not isinstance(value, torch.Tensor) and not isinstance(want, torch.Tensor) and value == want
            )
            difference = 0.0 if same else float("inf")
        equal &= same
        differences[path] = difference
    return equal, differences


def verify_inference_in_process(
    program: Program, steps: int = 3, seed: int = 0, rtol: float | None = None, device: str = "cpu"
) -> InferenceComparison:
    """Evaluate an inference program (``--schedule forward-only``) for ``steps`` batches on the
    in-process transport and compare what it returns for each micro-batch with the eager model's
    forward on it, both without autograd and with dropout switched off; buffers forward updates
    (a BatchNorm's running statistics in training mode) are compared after the last batch."""
    names = [i["name"] for i in program.data["inputs"]]
    pipeline = InProcessPipeline(program, seed=seed, device=device)  # as verify_in_process's
    spec = build_spec(program, seed)
    with dropout_switched_off() as dropped:
        if rtol is None:
            rtol, _ = precision_rtol(computed_dtypes(program, pipeline.named_parameters().values()))
        model = spec.module.to(device)
        data = batches(program, pipeline.spec, seed)
        equal, worst, drew = True, (0.0, "output"), False
        with torch.no_grad():
            for _ in range(steps):
                microbatches = next(data)
                # A forward that updates an input in place (x.mul_(2)) would hand the eager model
                # the pipeline's updated inputs: it gets them as they came.
                as_drawn = [[mb[n].to(device, copy=True) for n in names] for mb in microbatches]
                before = pipeline.random_states() + rng_states(device)
                pipeline.evaluate(microbatches)
                for inputs, got in zip(as_drawn, pipeline.results()):
                    expected = call_forward(model, names, inputs, spec.input_groups, spec.none_inputs)
                    same, differences = _output_differences(got, expected)
                    equal &= same
                    worst = max([worst, *((d, path) for path, d in differences.items())])
                drew |= moved(before, pipeline.random_states() + rng_states(device))
        buffers = {
            n: {rank: b.detach().cpu().clone() for rank, b in copies.items()}
            for n, copies in pipeline.named_buffers().items()
        }
        reference = {n: b.detach().cpu().clone() for n, b in buffers_and_plain_tensors(model).items()}
    buffer_fields = _worst_buffer(buffers, reference, rtol) if buffers else {}
    switched_off, left_on = random_ops(program, pipeline.spec.module)
    return InferenceComparison(
        steps=steps,
        outputs_bitwise_equal=equal,
        max_output_difference=worst[0],
        worst_output=worst[1],
        rtol=rtol,
        random_ops_switched_off=(switched_off or ("dropout called where verify cannot place it",))
        if dropped
        else (),
        random_ops_left_on=(left_on or ("an op verify cannot name",)) if drew else (),
        **buffer_fields,
    )
