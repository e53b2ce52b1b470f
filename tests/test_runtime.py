"""The correctness bar through the in-process transport: every model, K = 1..4, both schedules."""

import json

import pytest

from ppcompile.check_training import verify_in_process
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.train import InProcessPipeline
from tests.helpers import compile_to, tracked_step

MODELS = [
    "models/gpt.py:gpt_mini",
    "models/mlp.py:mlp",
    "models/mlp.py:mlp_deep",
    # Leaf nn.MultiheadAttention / LayerNorm / BatchNorm, three inputs, a buffer forward updates, a long skip.
    "tests/fixtures/zoo.py:encoder",
    # RMSNorm, rotary tables in buffers, SwiGLU, F.scaled_dot_product_attention.
    "tests/fixtures/zoo.py:llama",
    # Convolutions, BatchNorm2d running statistics, residual adds, pooling.
    "tests/fixtures/zoo.py:resnet",
    # In-place ReLU and mul_ whose results later stages read.
    "tests/fixtures/inplace.py:model",
]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("ref", MODELS)
def test_trains_like_eager(tmp_path, ref, stages, schedule):
    program = load_program(compile_to(tmp_path, ref, stages, microbatches=4, schedule=schedule))
    result = verify_in_process(program, steps=3, optimizer="sgd", lr=0.05)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal


@pytest.mark.parametrize("ref", ["models/gpt.py:gpt_mini", "models/mlp.py:mlp_deep"])
def test_trains_like_eager_with_adamw(tmp_path, ref):
    # Adam divides by sqrt(v): on zero-initialised biases, whose gradients are near zero, the last-bit
    # differences of summed tied gradients grow to ~1e-4 of the (tiny) parameter; gradients stay at 1e-7.
    program = load_program(compile_to(tmp_path, ref, 3, microbatches=6))
    result = verify_in_process(program, steps=3, optimizer="adamw", lr=1e-3, rtol=1e-3)
    assert result.ok, "\n".join(result.lines())
    assert result.max_gradient_difference <= 1e-5


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", [(2, 4), (4, 4), (4, 8)])
def test_live_activations_match_the_schedule(tmp_path, schedule, stages, microbatches):
    """1F1B: stage s holds at most K - s micro-batches' activations; GPipe holds M. Measured through
    saved_tensors_hooks, compared with the simulator's count in program.json."""
    program_dir = compile_to(
        tmp_path, "models/gpt.py:gpt_mini", stages, microbatches=microbatches, schedule=schedule
    )
    _, pipeline = tracked_step(program_dir)
    measured = pipeline.memory().peak_live_microbatches
    predicted = json.loads((program_dir / "program.json").read_text())["costs"]["simulated_live_microbatches"]
    expected = [min(stages - s, microbatches) if schedule == "1f1b" else microbatches for s in range(stages)]
    assert [measured[s] for s in range(stages)] == predicted == expected
    # Same bytes per micro-batch on every stage of one schedule as in the other: memory scales with the count.
    for executor in pipeline.executors:
        for stage, peak in executor.memory.peak_bytes.items():
            assert peak == executor.memory.bytes_per_microbatch[stage] * measured[stage]


def test_other_microbatch_size_trains_too(tmp_path):
    """Shapes are symbolic: the same program runs micro-batches of another size without recompiling."""
    import torch

    program = load_program(compile_to(tmp_path, "models/mlp.py:mlp", 3, microbatches=4))
    pipeline = InProcessPipeline(program)
    microbatches = [{"x": torch.randn(5, 32), "y": torch.randn(5, 8)} for _ in range(4)]
    losses = pipeline.step(microbatches, update=False)
    model = pipeline.spec.module
    with torch.no_grad():
        assert losses == [float(model(mb["x"], mb["y"])) for mb in microbatches]


def test_peer_failures_are_one_line_naming_what_the_rank_was_doing():
    import torch

    from ppcompile.runtime.transport import DistTransport, PeerError

    transport = DistTransport(rank=1, num_boundaries=1, timeout=20, device=torch.device("cpu"))
    where = "summing the tied gradients it shares with the stages on rank 0"

    def closed():
        raise RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore"
        )

    def slow():
        raise RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv")

    with pytest.raises(PeerError) as lost:
        transport.peer_call(closed, where)
    assert str(lost.value) == (
        f"rank 1: lost the connection in {where}: "
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"
    )
    with pytest.raises(PeerError, match=f"rank 1: timed out after 20 s in {where}; that rank died"):
        transport.peer_call(slow, where)
    assert transport.peer_call(lambda: 7, where) == 7
