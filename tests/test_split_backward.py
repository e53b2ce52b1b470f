"""I and W (the backward split for zero-bubble schedules) give B's gradients without redoing B's work.

Pipeline tests rewrite a compiled 1F1B program so that every B becomes I then W, either at once or
with every W deferred to the end of its rank, and compare one step with the plain program. Unit
tests hold ``backward_input`` / ``backward_weight`` to ``torch.autograd.backward`` on small graphs
that reach the edge cases (no inputs, no parameters, tied and unused parameters, pass-through
outputs) and count FLOPs to show that I + W does what B does, once.
"""

from __future__ import annotations

import functools
import gc
import re

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from ppcompile.runtime.executor import SavedActivations, backward_input, backward_weight
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.train import InProcessPipeline, batches
from tests.helpers import compile_to

REFS = ["models/gpt.py:gpt_mini", "models/mlp.py:mlp_deep", "tests/fixtures/zoo.py:encoder"]
M = 4


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile each (model, K) once for the whole module; call it from a test (the cwd is the repo)."""

    @functools.cache
    def get(ref: str, stages: int):
        return compile_to(tmp_path_factory.mktemp("split"), ref, stages, microbatches=M, schedule="1f1b")

    return get


def split_schedule(text: str, deferred: bool) -> str:
    """Every ``sBm`` becomes ``sIm sWm``; deferred: the W's go after the rank's last action, in order."""
    actions, weights = [], []
    for token in text.split():
        match = re.fullmatch(r"(\d+)B(\d+)", token)
        if match is None:
            actions.append(token)
            continue
        stage, m = match.groups()
        actions.append(f"{stage}I{m}")
        (weights if deferred else actions).append(f"{stage}W{m}")
    return " ".join(actions + weights)


def run_step(program_dir, mode: str | None):
    """One step (no update) of the program, its schedule rewritten by ``mode``: None, "now" or "deferred"."""
    program = load_program(program_dir)
    ranks = program.data["schedule"]["ranks"]
    if mode is not None:
        for rank in ranks:
            ranks[rank] = split_schedule(ranks[rank], deferred=mode == "deferred")
    pipeline = InProcessPipeline(program, track_memory=True)
    losses = pipeline.step(next(batches(program, pipeline.spec, 0)), update=False)
    grads = {n: g.clone() for n, g in pipeline.named_gradients().items() if g is not None}
    peaks = {}
    for executor in pipeline.executors:
        peaks.update(executor.memory.peak_live_microbatches)
    return losses, grads, peaks, ranks


def pending_microbatches(ranks: dict[str, str]) -> dict[int, int]:
    """Per stage, the most micro-batches run forward whose B or W has not run yet."""
    peaks: dict[int, int] = {}
    for text in ranks.values():
        live: dict[int, int] = {}
        for token in text.split():
            stage, kind = re.fullmatch(r"(\d+)([A-Z_]+)\d*", token).groups()
            stage = int(stage)
            live[stage] = live.get(stage, 0) + {"F": 1, "B": -1, "W": -1}.get(kind, 0)
            peaks[stage] = max(peaks.get(stage, 0), live[stage])
    return peaks


@pytest.mark.parametrize("mode", ["now", "deferred"])
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("ref", REFS)
def test_split_backward_matches_full_backward(compiled, ref, stages, mode):
    program_dir = compiled(ref, stages)
    want_losses, want, want_peaks, plain = run_step(program_dir, None)
    losses, grads, peaks, ranks = run_step(program_dir, mode)
    assert losses == want_losses
    assert grads.keys() == want.keys()
    for name, grad in grads.items():
        scale = want[name].abs().max().item()
        torch.testing.assert_close(grad, want[name], rtol=1e-6, atol=1e-7 * scale, msg=name)
    # Bitwise, in fact: I and W run the very kernels B runs, on the same values.
    assert all(torch.equal(grads[n], want[n]) for n in want)
    # A micro-batch's activations stay live until its W, so deferring every W keeps all M alive.
    assert want_peaks == pending_microbatches(plain) == {s: stages - s for s in range(stages)}
    assert peaks == pending_microbatches(ranks)
    if mode == "deferred":
        assert peaks == {s: M for s in range(stages)}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # isinstance() on every object wakes deprecated ones
def test_split_backward_frees_every_graph_when_its_step_ends(compiled):
    """Each saved tensor's unpack hook holds its micro-batch's SavedActivations, whose boxes hold
    tensors whose grad_fn holds the hooks: a cycle through autograd's C++ nodes that Python's
    collector cannot free. W breaks it, or every step's graphs would stay alive."""
    program = load_program(compiled("models/gpt.py:gpt_mini", 2))
    ranks = program.data["schedule"]["ranks"]
    for rank in ranks:
        ranks[rank] = split_schedule(ranks[rank], deferred=False)
    pipeline = InProcessPipeline(program)
    data = batches(program, pipeline.spec, 0)
    tensors = []
    for _ in range(3):
        pipeline.step(next(data))
        gc.collect()
        alive = gc.get_objects()
        assert not any(isinstance(o, SavedActivations) for o in alive)
        tensors.append(sum(isinstance(o, torch.Tensor) for o in alive))
        del alive
    assert tensors[1] == tensors[2]


def test_schedule_with_i_but_no_w_or_w_before_i_is_rejected(compiled):
    program = load_program(compiled("models/mlp.py:mlp_deep", 2))
    last = program.data["schedule"]["ranks"]["1"]
    program.data["schedule"]["ranks"]["1"] = split_schedule(last, deferred=True).replace("1W3", "")
    pipeline = InProcessPipeline(program)
    with pytest.raises(ValueError, match="never 1W3"):
        pipeline.step(next(batches(program, pipeline.spec, 0)))

    program = load_program(compiled("models/mlp.py:mlp_deep", 2))
    text = split_schedule(program.data["schedule"]["ranks"]["1"], deferred=False)
    program.data["schedule"]["ranks"]["1"] = text.replace("1I0 1W0", "1W0 1I0")
    pipeline = InProcessPipeline(program)
    with pytest.raises(ValueError, match="1W0 has no 1I0"):
        pipeline.step(next(batches(program, pipeline.spec, 0)))


# backward_input / backward_weight against torch.autograd.backward ------------------------------


def split_versus_full(forward, inputs, params, grads=None):
    """Run ``forward`` twice: B (``autograd.backward``) and I + W. Compare every gradient bitwise.

    Returns (FLOPs of B, of I, of W) and the boxes of saved activations after I.
    """

    def fresh():
        for p in params:
            p.grad = None
        return [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]

    xs = fresh()
    roots = forward(*xs)
    with FlopCounterMode(display=False) as full:
        torch.autograd.backward(roots, grads)
    want_inputs = [x.grad for x in xs if x.requires_grad]
    want = [p.grad for p in params]

    xs = fresh()
    saved = SavedActivations()
    with saved.hooks():
        roots = forward(*xs)
    held_before = saved.live_bytes()
    with FlopCounterMode(display=False) as input_half:
        got_inputs, pending = backward_input(roots, grads, [x for x in xs if x.requires_grad], params, saved)
    held_after = saved.live_bytes()
    del roots
    assert all(p.grad is None for p in params), "I must leave weight gradients to W"
    with FlopCounterMode(display=False) as weight_half:
        backward_weight(pending)
    assert pending.groups == [] and pending.saved is None

    for got, expected in [*zip(got_inputs, want_inputs), *zip((p.grad for p in params), want)]:
        assert (got is None) == (expected is None)
        if got is not None:
            assert torch.equal(got, expected)
    flops = [mode.get_total_flops() for mode in (full, input_half, weight_half)]
    return flops, held_before, held_after


def test_mlp_splits_flops_and_frees_input_side_activations():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(x):
        return [lin2(torch.sin(lin1(x))).square().mean()]  # sin saves lin1's output, which W never reads

    params = [*lin1.parameters(), *lin2.parameters()]
    (full, i, w), before, after = split_versus_full(forward, [torch.randn(32, 8, requires_grad=True)], params)
    assert i + w == full and i > 0 and w > 0  # nothing computed twice
    assert after <= before - 32 * 16 * 4  # I freed sin's saved input: (32, 16) float32


def test_first_stage_without_inputs_leaves_everything_to_w():
    torch.manual_seed(0)
    embed, lin = nn.Embedding(10, 8), nn.Linear(8, 8)
    tokens = torch.randint(0, 10, (4, 5))
    out = torch.randn(4, 5, 8)

    def forward(t):
        return [lin(embed(t))]

    (full, i, w), _, _ = split_versus_full(forward, [tokens], [*embed.parameters(), *lin.parameters()], [out])
    assert i == 0 and w == full


def test_stage_without_parameters_does_everything_in_i():
    x = torch.randn(3, 4, requires_grad=True)
    m = torch.randn(3, 4)  # a received tensor that does not require grad

    def forward(x, m):
        return [(x @ x.T).tanh() * m.sum(), x.exp()]  # two roots

    grads = [torch.randn(3, 3), torch.randn(3, 4)]
    (full, i, w), _, _ = split_versus_full(forward, [x, m], [], grads)
    assert i == full and w == 0


def test_unused_pass_through_and_weight_only_roots():
    torch.manual_seed(0)
    lin, unused = nn.Linear(4, 4), nn.Linear(4, 4)
    scale = nn.Parameter(torch.randn(4))

    def forward(x, y):
        # x goes on unchanged (a skip connection), scale * 2 depends on no input, y is never read.
        return [lin(x).relu().sum(), x, scale * 2]

    params = [*lin.parameters(), *unused.parameters(), scale]
    inputs = [torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    split_versus_full(forward, inputs, params, [None, torch.randn(2, 4), torch.randn(4)])
    assert unused.weight.grad is None


def test_tied_weight_used_twice_in_one_stage():
    """One Parameter in two layers, one below the other: W restarts at both and must count nothing twice."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    other = nn.Linear(6, 6)

    def forward(x):
        return [lin(other(lin(x).tanh())).pow(2).sum()]

    params = [*lin.parameters(), *other.parameters()]
    (full, i, w), _, _ = split_versus_full(forward, [torch.randn(5, 6, requires_grad=True)], params)
    # W reruns the input side between the two uses (other's dX and the inner lin's dX): two (5, 6, 6) matmuls.
    assert i + w == full + 2 * (2 * 5 * 6 * 6)


@pytest.mark.parametrize("ends_in", [nn.Linear, nn.GELU])
def test_checkpointed_region_is_recomputed_for_i_and_for_w(ends_in):
    # A region ending in an activation is recomputed in I from that activation, a node W does not
    # run again; W recomputes it once more for its linear layers, from the same inputs.
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), *([nn.GELU()] if ends_in is nn.GELU else [])
    )
    head = nn.Linear(8, 2)

    def forward(x):
        return [head(checkpoint(block, x, use_reentrant=False)).sum()]

    params = [*block.parameters(), *head.parameters()]
    split_versus_full(forward, [torch.randn(4, 8, requires_grad=True)], params)


def test_group_norm_weights_are_taken_in_i_on_a_channels_last_input():
    """W would restart GroupNorm's backward for its weight and bias alone, which torch's CPU kernel
    on a channels-last input does not survive (a segmentation fault); I takes them beside the
    input's gradient, and the gradients are the full backward's."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
    conv, norm = conv.to(memory_format=torch.channels_last), norm.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    params = [*conv.parameters(), *norm.parameters()]

    def loss():
        return norm(conv(x)).square().mean()

    want = torch.autograd.grad(loss(), [x, *params])
    (dx,), pending = backward_input([loss()], None, [x], params)
    assert all(p.grad is not None for p in norm.parameters())  # taken in I
    backward_weight(pending)
    assert torch.equal(dx, want[0])
    for p, g in zip(params, want[1:]):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)
