"""The correctness bar through the in-process transport: every model, K = 1..4, both schedules."""

import json
import os
from pathlib import Path

import pytest
import torch

from ppcompile.check_training import verify_in_process
from ppcompile.errors import CompileError
from ppcompile.runtime.loader import ProgramError, load_program
from ppcompile.runtime.train import InProcessPipeline, batches
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


@pytest.mark.parametrize(
    "optimizer, ref",
    [
        # gpt_mini ties its embedding and head across the cut: their gradients are summed before the step.
        ("sgd-momentum", "models/gpt.py:gpt_mini"),
        ("adam", "models/gpt.py:gpt_mini"),
        ("rmsprop", "models/gpt.py:gpt_mini"),
        # Adagrad's first step moves every parameter by lr times its gradient's sign (eps 1e-10): the
        # attention's key bias, whose gradient is zero but for float rounding, moves by a rounding's
        # sign, differently in any two correct runs. mlp_deep has no such parameter.
        ("adagrad", "models/mlp.py:mlp_deep"),
    ],
)
def test_trains_like_eager_with_each_optimizer(tmp_path, optimizer, ref):
    program = load_program(compile_to(tmp_path, ref, 2, microbatches=4, optimizer=optimizer))
    result = verify_in_process(program, steps=3, optimizer=optimizer, lr=1e-3, rtol=1e-3)
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

    program = load_program(compile_to(tmp_path, "models/mlp.py:mlp", 3, microbatches=4))
    pipeline = InProcessPipeline(program)
    microbatches = [{"x": torch.randn(5, 32), "y": torch.randn(5, 8)} for _ in range(4)]
    losses = pipeline.step(microbatches, update=False)
    model = pipeline.spec.module
    with torch.no_grad():
        assert losses == [float(model(mb["x"], mb["y"])) for mb in microbatches]


DROPOUT_WITH_DATA = "tests/fixtures/verify_dropout.py:with_data"


def dropout_losses(program_dir, steps: int = 3) -> list[list[float]]:
    """Losses of ``steps`` sgd steps in process, dropout on, on the program's own data."""
    program = load_program(program_dir)
    pipeline = InProcessPipeline(program, seed=0, optimizer="sgd", lr=0.05)
    data = batches(program, pipeline.spec, 0)
    return [pipeline.step(next(data)) for _ in range(steps)]


def test_dropout_draws_the_same_masks_under_every_schedule(tmp_path):
    # Each stage draws from its own stream, in micro-batch order: the schedule, which interleaves
    # the stages' forwards differently, changes nothing. With one generator for all it would.
    def losses(schedule: str, ranks: int, virtual_stages: int = 1) -> list[list[float]]:
        where = tmp_path / f"{schedule}-{ranks}"
        return dropout_losses(
            compile_to(
                where,
                DROPOUT_WITH_DATA,
                ranks,
                microbatches=4,
                schedule=schedule,
                virtual_stages=virtual_stages,
            )
        )

    two = losses("gpipe", 2)
    assert losses("1f1b", 2) == two
    assert losses("zb-h1", 2) == two
    assert losses("interleaved-1f1b", 2, virtual_stages=2) == losses("1f1b", 4)  # four stages
    assert len({loss for step in two for loss in step}) == 12  # the batches do differ


def test_stages_draw_unlike_masks_and_the_data_does_not_see_them(tmp_path):
    program = load_program(compile_to(tmp_path, DROPOUT_WITH_DATA, 2, microbatches=4))
    pipeline = InProcessPipeline(program, seed=0)
    # Two stages' first masks of one shape: the same under one seed per rank, unlike here.
    first_draws = []
    for executor in pipeline.executors:
        (stream,) = executor.random.values()
        with stream.drawing():
            first_draws.append(torch.rand(64))
    assert not torch.equal(*first_draws)
    # A data function on the global generator gives every rank the same batches, whatever the
    # rank drew in between: here one reader draws a mask's worth between batches, one does not.
    quiet, busy = batches(program, pipeline.spec, 0), batches(program, pipeline.spec, 0)
    for _ in range(3):
        torch.rand(1000)
        a, b = next(quiet), next(busy)
        assert all(torch.equal(x[n], y[n]) for x, y in zip(a, b) for n in x)


def test_peer_failures_are_one_line_naming_what_the_rank_was_doing():

    from ppcompile.runtime.transport import DistTransport, PeerError

    transport = DistTransport(rank=1, num_stages=2, timeout=20, device=torch.device("cpu"))
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


def test_sender_thread_sends_in_order_and_raises_a_failed_send_on_the_computing_thread():

    from ppcompile.runtime.transport import DistTransport, GlooSender, PeerError

    transport = DistTransport(rank=0, num_stages=2, timeout=5, device=torch.device("cpu"))
    sender = GlooSender(transport)

    class Group:  # a gloo group as far as the sender sees it: send returns a work to wait on
        def __init__(self):
            self.sent = []

        def send(self, tensors, peer, tag):
            if tag == 99:
                raise RuntimeError(
                    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"
                )
            self.sent.append((tensors[0].item(), peer, tag))
            return f"work{tag}"

    group = Group()
    for tag in range(20):
        sender.put(torch.tensor(float(tag)), 1, group, tag, "sending to stage 1 on rank 1")
    sender.drain()
    assert group.sent == [(float(tag), 1, tag) for tag in range(20)]
    assert [work for work, _, _ in transport.pending] == [f"work{tag}" for tag in range(20)]

    sender.put(torch.tensor(0.0), 1, group, 99, "sending to stage 1 on rank 1")
    with pytest.raises(PeerError, match="rank 0: lost the connection in sending to stage 1 on rank 1"):
        sender.drain()
    with pytest.raises(PeerError):  # and on the next send, too: the step cannot go on
        sender.put(torch.tensor(0.0), 1, group, 3, "sending to stage 1 on rank 1")


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("preempts", [False, True])
def test_sender_thread_waits_for_a_free_core_unless_told_to_preempt(preempts):

    from ppcompile.runtime.transport import DistTransport, GlooSender

    transport = DistTransport(rank=0, num_stages=2, timeout=5, device=torch.device("cpu"))
    sender = GlooSender(transport, preempts=preempts)

    class Group:  # records the policy of the thread that makes the send call
        def send(self, tensors, peer, tag):
            self.policy = os.sched_getscheduler(0)
            return None

    group = Group()
    sender.put(torch.zeros(1), 1, group, 0, "sending to stage 1 on rank 1")
    sender.drain()
    assert group.policy == (os.SCHED_OTHER if preempts else os.SCHED_BATCH)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the computing thread keeps its policy


def test_pack_round_trips_every_dtype_into_tensors_that_own_their_memory():

    from ppcompile.runtime.transport import ALIGNMENT, pack, packed_size, unpack, wire_payload

    tensors = [
        torch.randn(3, 5),
        torch.tensor([True, False, True]),
        torch.arange(7, dtype=torch.int64).reshape(7, 1)[::2],  # not contiguous
        torch.randn(2, 2, dtype=torch.bfloat16),
        torch.tensor(2.5, dtype=torch.float64),  # 0-dim
        torch.randn(4, dtype=torch.complex64).conj(),  # a lazy conjugate (w.conj() in forward)
        -torch.randn(3, dtype=torch.complex64).conj(),  # and a lazy negation of one
    ]
    shapes, dtypes = [t.shape for t in tensors], [t.dtype for t in tensors]
    buffer = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == packed_size(shapes, dtypes)
    assert buffer.numel() <= sum(t.numel() * t.element_size() for t in tensors) + ALIGNMENT * len(tensors)
    out = unpack(buffer, shapes, dtypes)
    for sent, received in zip(tensors, out):
        assert received.dtype == sent.dtype and torch.equal(received, sent)
        assert received.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    # Sent alone, a lazy conjugate travels as its values too.
    (alone,) = tensors[-2:-1]
    assert not wire_payload([alone]).is_conj() and torch.equal(wire_payload([alone]), alone)


@pytest.mark.parametrize("alone", [True, False])
def test_a_tensor_travels_in_its_memory_order_and_arrives_laid_out_as_it_left(alone):
    # (B, T, C) lying in memory as (B, C, T), and attention's (B, T, C) output as (T, B, C): each
    # arrives with the sender's strides, packed in a message with others or alone.
    from ppcompile.runtime.transport import InProcessTransport, MessageKey, Receive

    stream = torch.randn(4, 8, 6).transpose(1, 2)
    attention = torch.randn(6, 4, 8).transpose(0, 1)
    plain = torch.randn(4, 6)
    mask = torch.rand(4, 6).t() > 0.5  # bool travels as uint8
    spectrum = torch.randn(6, 4, dtype=torch.complex64).t()
    sent = [stream] if alone else [stream, attention, plain, mask, spectrum]
    orders = ((0, 2, 1), (1, 0, 2), (), (1, 0), (1, 0))[: len(sent)]
    transport = InProcessTransport()
    key = MessageKey(microbatch=0, gradient=False, src_stage=0, dst_stage=1)
    transport.send(key, sent, peer_rank=1, dim_orders=orders)
    receive = Receive(key, 0, tuple(t.shape for t in sent), tuple(t.dtype for t in sent), orders)
    ((*received,),) = transport.try_receive([receive], "RECV_F 0")
    for before, after in zip(sent, received):
        assert torch.equal(after, before) and after.stride() == before.stride()
        assert after.untyped_storage().data_ptr() != before.untyped_storage().data_ptr()
    # A tensor the sender holds in another layout than the program says still arrives whole.
    transport.send(key, [stream.contiguous()] + sent[1:], peer_rank=1, dim_orders=orders)
    ((first, *_),) = transport.try_receive([receive], "RECV_F 0")
    assert torch.equal(first, stream) and first.stride() == stream.stride()


def test_the_in_process_transport_reads_a_sent_tensor_when_it_is_received():
    # As late as a real wire may read it: a tensor the sender changes after sending arrives
    # changed, so breadth tests in one process catch what a sender thread would get wrong.
    from ppcompile.runtime.transport import InProcessTransport, MessageKey, Receive

    transport = InProcessTransport()
    key = MessageKey(microbatch=0, gradient=False, src_stage=0, dst_stage=1)
    counter = torch.tensor(1)
    transport.send(key, [counter], peer_rank=1)
    counter.add_(1)
    receive = Receive(key, 0, (counter.shape,), (counter.dtype,))
    ((received,),) = transport.try_receive([receive], "RECV_F 0")
    assert received.item() == 2
    assert received.untyped_storage().data_ptr() != counter.untyped_storage().data_ptr()


@pytest.mark.parametrize("stages", [3, 4])
def test_a_buffer_sent_as_it_is_travels_as_a_copy(tmp_path, stages):
    # The counter is advanced on the first stage and read by the last: sent as the buffer itself,
    # the next micro-batch's advance would reach the receiver first (the wire reads it late).
    program_dir = compile_to(tmp_path, "tests/fixtures/buffer_assign.py:warmed_up", stages, microbatches=4)
    first = stage_codes(program_dir)[0]
    assert '"add_": add_.clone()' in first
    assert "# add_: a buffer the next micro-batch changes, sent as a copy" in first
    assert ".clone()" not in "".join(stage_codes(program_dir)[1:])
    trains_as_eager(program_dir)


def test_a_cut_crossing_several_tensors_is_one_message_per_direction(tmp_path):
    """The encoder's first cut crosses three tensors; each micro-batch sends one message forward and
    one back, and the step still trains like eager."""
    from ppcompile.runtime.train import batches

    program = load_program(compile_to(tmp_path, "tests/fixtures/zoo.py:encoder", 2, microbatches=4))
    crossing = [b for b in program.data["boundaries"] if b["producer"] == 0 and b["consumers"] == [1]]
    assert len(crossing) == len(program.data["boundaries"]) >= 3
    pipeline = InProcessPipeline(program)
    pipeline.step(next(batches(program, pipeline.spec, seed=0)))
    assert pipeline.transport.sent == 4 + 4  # M messages forward, M back
    result = verify_in_process(program, steps=2, optimizer="sgd", lr=0.05)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal


def test_gradient_comparison_tolerates_rounding_noise_of_a_zero_gradient_but_not_a_wrong_one():
    """A bias that BatchNorm cancels has a gradient of rounding noise (~1e-9 beside ~0.1): two correct
    runs summing in another order disagree on it completely, and that is not a difference. A
    real error of 1e-4 in an ordinary gradient still is."""

    from ppcompile.check_training import compare

    params = {"w": torch.zeros(2)}
    reference = ([[1.0]], {"w": torch.tensor([0.1, -0.2]), "cancelled": torch.tensor([4e-9, -7e-9])}, params)
    noisy = {"w": torch.tensor([0.1, -0.2]), "cancelled": torch.tensor([-3e-9, 9e-10])}
    assert compare([[1.0]], noisy, params, reference).ok
    # A few float32 epsilons of the model's gradient scale (0.2) on it pass; ten times that does not.
    reordered = {"w": torch.tensor([0.1, -0.2]), "cancelled": torch.tensor([4e-9 + 3e-8, -7e-9])}
    assert compare([[1.0]], reordered, params, reference).ok
    off = {"w": torch.tensor([0.1, -0.2]), "cancelled": torch.tensor([4e-9 + 3e-7, -7e-9])}
    result = compare([[1.0]], off, params, reference)
    assert not result.ok and result.worst_gradient == "cancelled"
    wrong = {"w": torch.tensor([0.1, -0.2 + 2e-5]), "cancelled": torch.tensor([4e-9, -7e-9])}
    result = compare([[1.0]], wrong, params, reference)
    assert not result.ok and result.worst_gradient == "w"


def test_parameter_comparison_tolerates_a_parameter_made_of_noisy_updates_but_not_a_wrong_one():
    """nn.MultiheadAttention's output bias starts at zero; before a BatchNorm its gradient is rounding
    noise, so after a few steps it holds nothing but noise, ~1e-11 beside updates of ~1e-3. It is
    compared against a share of the model's largest update, as such a gradient is against the
    largest gradient; an ordinary parameter off by 1e-4 is still a difference."""
    from ppcompile.check_training import compare

    grads = {"w": torch.tensor([0.1, -0.2]), "bias": torch.tensor([0.0, 0.0])}
    initial = {"w": torch.tensor([1.0, -1.0]), "bias": torch.zeros(2)}
    trained = {"w": torch.tensor([1.001, -1.002]), "bias": torch.tensor([3e-11, -2e-11])}
    reference = ([[1.0]], grads, trained)
    noisy = {"w": trained["w"], "bias": torch.tensor([-1e-11, 4e-11])}
    assert not compare([[1.0]], grads, noisy, reference).ok  # against its own scale: off entirely
    assert compare([[1.0]], grads, noisy, reference, initial_parameters=initial).ok
    wrong = {"w": torch.tensor([1.001, -1.002 + 1e-4]), "bias": trained["bias"]}
    result = compare([[1.0]], grads, wrong, reference, initial_parameters=initial)
    assert not result.ok and result.worst_parameter == "w"
    stuck = {"w": trained["w"], "bias": torch.tensor([3e-11, 1e-4])}  # a real update it lacks or gained
    result = compare([[1.0]], grads, stuck, reference, initial_parameters=initial)
    assert not result.ok and result.worst_parameter == "bias"


def test_rank_device_gives_each_local_rank_a_gpu_or_says_why_not(monkeypatch):
    from ppcompile.runtime.main import rank_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", 1, 1) == torch.device("cpu")
    with pytest.raises(ProgramError, match="torch sees no GPU on this machine; use --device cpu"):
        rank_device("cuda", 0, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert rank_device("auto", 0, 0) == torch.device("cuda:0")
    assert rank_device("cpu", 1, 1) == torch.device("cpu")
    with pytest.raises(ProgramError, match="rank 1 needs GPU 1 but torch sees 1 GPU here.*--device cpu"):
        rank_device("auto", 1, 1)


def test_gpu_runs_print_their_peak_beside_the_prediction(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from ppcompile.runtime.main import _peak_memory_line

    # Interleaved: rank 1 holds stages 1 and 5, and its peak is theirs together.
    program = load_program(
        compile_to(
            tmp_path,
            "models/gpt.py:gpt_mini",
            4,
            microbatches=4,
            schedule="interleaved-1f1b",
            virtual_stages=2,
        )
    )
    assert program.stages_of_rank(1) == [1, 5]
    predicted = sum(program.data["costs"]["memory"][s]["total"] for s in (1, 5))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    line = _peak_memory_line(program, 1, torch.device("cuda:1"), SimpleNamespace(infer=False))
    assert line == (
        f"rank 1: peak GPU memory 3.00 GiB allocated (the compiler predicted {predicted / 2**30:.2f} GiB "
        "with adamw state)"
    )
    assert "predicted" not in _peak_memory_line(
        program, 1, torch.device("cuda:1"), SimpleNamespace(infer=True)
    )


NO_GRAD = "tests/fixtures/no_grad_regions.py"


@pytest.mark.parametrize("stages", [2, 4])
def test_no_grad_regions_train_like_eager(tmp_path, stages):
    program_dir = compile_to(tmp_path, f"{NO_GRAD}:model", stages, microbatches=4)
    codes = stage_codes(program_dir)
    # Six blocks and the teacher's method each open one; a region a cut falls inside opens on both
    # stages, as each runs its share of the nodes under it.
    assert sum(code.count("with torch.no_grad():  # as the model's forward") for code in codes) >= 7
    assert "_set_grad_enabled" not in "".join(codes)
    program = load_program(program_dir)
    result = verify_in_process(program, steps=3)
    assert result.ok, "\n".join(result.lines())
    assert result.worst_buffer is not None  # the running means were compared
    # The teacher is frozen by no_grad: no rank gives it a gradient.
    pipeline = InProcessPipeline(program)
    pipeline.step(next(batches(program, pipeline.spec, 0)))
    assert pipeline.named_gradients()["teacher.weight"] is None
    # Inference leaves grad mode off through the regions; training finds it on afterwards.
    with torch.no_grad():
        pipeline.evaluate(next(batches(program, pipeline.spec, 0)))
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_cuts_fall_inside_a_frozen_backbones_no_grad_region(tmp_path):
    # The backbone is 8 of 10 layers: each of the 4 stages runs its share under torch.no_grad(),
    # and no gradient goes back across a cut inside the region.
    program_dir = compile_to(tmp_path, f"{NO_GRAD}:linear_probe", 4, microbatches=8)
    program = json.loads((program_dir / "program.json").read_text())
    times = [s["compute_seconds"] for s in program["costs"]["stages"]]
    assert max(times) / (sum(times) / 4) < 1.25  # held whole on one stage: 2.4
    codes = stage_codes(program_dir)
    assert sum("with torch.no_grad():" in code for code in codes) >= 3
    inside = [b for b in program["boundaries"] if b["producer"] < 2]
    assert inside and not any(b["requires_grad"] for b in inside)
    trains_as_eager(program_dir)


def test_no_grad_region_inside_a_recomputed_layer(tmp_path):
    plain = compile_to(tmp_path / "plain", f"{NO_GRAD}:untracked", 4, microbatches=4)
    peaks = [m["total"] for m in json.loads((plain / "program.json").read_text())["costs"]["memory"]]
    budget = int(0.8 * max(peaks))  # bytes
    program_dir = compile_to(
        tmp_path / "tight", f"{NO_GRAD}:untracked", 4, microbatches=4, memory_per_device=budget
    )
    recomputed = [
        p.read_text() for p in program_dir.glob("stage_*.py") if "checkpoint.checkpoint(" in p.read_text()
    ]
    assert any("with torch.no_grad():" in code.split("def _recompute_", 1)[-1] for code in recomputed)
    result = verify_in_process(load_program(program_dir), steps=2)
    assert result.ok, "\n".join(result.lines())


@pytest.mark.parametrize("stages", [2, 4])
def test_masks_made_from_the_inputs_are_made_again_not_sent(tmp_path, stages):
    # The padding and causal masks every layer reads and the shifted labels the last stage reads
    # come from the inputs alone: each stage makes its own, and only hidden states (needing a
    # gradient) cross the cuts, beside the no_grad scale of a parameter, made where the parameter is.
    program_dir = compile_to(tmp_path, "tests/fixtures/input_masks.py:model", stages, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    without_gradient = [b["shape"] for b in program["boundaries"] if not b["requires_grad"]]
    assert program["boundaries"] and without_gradient in ([], [[]])
    codes = stage_codes(program_dir)
    assert all("masked_fill = mul.masked_fill(triu, -10000.0)" in code for code in codes)
    assert "labels[:, 1:]" in codes[-1]
    assert sum("self.temperature" in code for code in codes) == 1
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
def test_a_momentum_teacher_is_updated_on_the_stage_that_runs_it(tmp_path, stages):
    # The teacher's weights are written at the top of forward and read by its layers' calls: each
    # update moves beside the first layer holding the weight, and no cut parts them.
    program_dir = compile_to(
        tmp_path, "tests/fixtures/weights_written.py:momentum_teacher", stages, microbatches=4
    )
    written_where_called(
        stage_codes(program_dir), [(f"self.teacher[{i}]", f"self.teacher[{i}].weight") for i in (0, 2, 4)]
    )
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
def test_moco_key_encoder_updated_through_data_and_its_queue_train_as_eager(tmp_path, stages):
    # k.data = k.data * m + q.data * (1 - m) is a copy without gradient into the weight, placed
    # beside the key encoder's layer on whichever stage runs it.
    program_dir = compile_to(
        tmp_path, "tests/fixtures/weights_written.py:momentum_contrast", stages, microbatches=4
    )
    written_where_called(
        stage_codes(program_dir),
        [
            ("self.encoder_k[0][0]", "encoder_k_0_0_weight.copy_("),
            ("self.encoder_k[2]", "encoder_k_2_weight.copy_("),
        ],
    )
    trains_as_eager(program_dir)


def test_sparse_embedding_gradients_train_like_eager(tmp_path):
    # Sparse gradients are compared dense (they have no max()).
    program_dir = compile_to(tmp_path, "tests/fixtures/sparse_grads.py:model", 2, microbatches=4)
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
def test_custom_autograd_functions_keep_their_backward(tmp_path, stages):
    # A gradient reversal and a straight-through round: traced into, the domain head's gradient
    # would reach the features unreversed and the round's would be zero.
    program_dir = compile_to(tmp_path, "tests/fixtures/custom_functions.py:model", stages, microbatches=4)
    code = "\n".join(stage_codes(program_dir))
    assert "self.functions.GradReverse.apply(" in code
    assert "self.functions.Quantise_StraightThrough.apply(" in code
    assert "'<model>:Quantise.StraightThrough'" in code
    trains_as_eager(program_dir)


def test_custom_functions_bound_before_tracing_keep_their_backward(tmp_path):
    # Bound before tracing, apply once ran torch's own code on the tracer's proxies, which traced
    # into forward: the reversal and the round's straight-through gradient were lost.
    program_dir = compile_to(tmp_path, "tests/fixtures/custom_functions.py:bound_early", 2, microbatches=4)
    code = "\n".join(stage_codes(program_dir))
    for function in ("GradReverse", "Quantise_StraightThrough", "Scaled"):
        assert f"self.functions.{function}.apply(" in code
    trains_as_eager(program_dir)


def test_an_embedding_with_max_norm_looked_up_twice_keeps_both_lookups_on_one_stage(tmp_path):
    # Each lookup rescales the rows it reads in place: cut apart, the second lookup's stage would
    # hold a copy of the weight the first never rescales. Before, the compile was refused.
    program_dir = compile_to(tmp_path, "tests/fixtures/weights_written.py:shared_max_norm", 4, microbatches=4)
    codes = stage_codes(program_dir)
    assert [code.count("self.embed(") for code in codes] == [2, 0, 0, 0]
    trains_as_eager(program_dir)


def test_a_custom_function_that_marks_its_input_dirty_gets_a_copy_of_what_it_receives(tmp_path):
    # ScaleInPlace writes its input and marks it dirty; right after a cut that input is a received
    # leaf, which autograd does not let change in place: the stage copies it first, as it copies a
    # received tensor that x += y writes.
    program_dir = compile_to(tmp_path, "tests/fixtures/custom_functions.py:marks_dirty", 2, microbatches=4)
    code = "\n".join(stage_codes(program_dir))
    assert (
        "b = b.clone()  # changed in place below\n        apply = self.functions.ScaleInPlace.apply(b" in code
    )
    trains_as_eager(program_dir)


@pytest.mark.parametrize("fixture", ["custom_functions", "inplace"])
def test_profile_times_custom_functions_and_in_place_layers(tmp_path, fixture):
    # --profile runs fx's own code for the graph, which must hold a Function's apply itself; and it
    # times nn.ReLU(inplace=True) again and again on one input, whose backward then needs new copies.
    program_dir = compile_to(
        tmp_path,
        f"tests/fixtures/{fixture}.py:model",
        2,
        microbatches=4,
        profile=True,
        profile_concurrency=1,
        profile_cache=str(tmp_path / "profiles"),
    )
    assert json.loads((program_dir / "program.json").read_text())["config"]["costs_measured_on"] == "cpu"
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_augmented_assignment_changes_every_name_of_a_tensor(tmp_path, stages):
    # acc += h, h *= 2, flat -= 0.5 change the tensor in place, as eager does, so its other names
    # (an alias, a slice taken before, a list's item) see it; a slice sent before the write would
    # not, so no cut falls between a view and a later write it is read after.
    program_dir = compile_to(tmp_path, "tests/fixtures/augmented_assignment.py:model", stages, microbatches=4)
    code = "\n".join(stage_codes(program_dir))
    assert " += tanh" in code and " *= 0.5" in code and " -= 0.5" in code
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
def test_tensors_made_from_sizes_are_made_by_each_stage(tmp_path, stages):
    # torch.tensor(d_k) in every attention layer, torch.tensor(x.shape[1:]) at the end: nodes made
    # from the micro-batch's sizes where they are read, never sent.
    program_dir = compile_to(tmp_path, "tests/fixtures/tensors_from_sizes.py:model", stages, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    assert all(b["requires_grad"] for b in program["boundaries"])
    codes = stage_codes(program_dir)
    assert sum(code.count("torch.tensor(size") for code in codes) == 4
    assert "torch.as_tensor(" in codes[-1]
    trains_as_eager(program_dir)


def test_a_scripted_helper_is_traced_through_its_python_function(tmp_path):
    program_dir = compile_to(tmp_path, "tests/fixtures/scripted_helper.py:model", 2, microbatches=4)
    code = "\n".join(stage_codes(program_dir))
    assert code.count("torch.tanh(") == 4 and "bias_gelu" not in code
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
def test_a_sequence_first_model_splits_its_named_batch_dim(tmp_path, stages):
    # (T, B) inputs with dims naming dim 1 the batch: micro-batches take whole sequences.
    program_dir = compile_to(tmp_path, "tests/fixtures/sequence_first.py:named", stages, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    assert {tuple(b["shape"]) for b in program["boundaries"]} == {("s", "b", "16")}
    trains_as_eager(program_dir)


def written_where_called(codes: list[str], layers: list[tuple[str, str]]) -> None:
    """Each (layer's call, its weight's write) in stage code: one stage calls the layer, and the
    weight is written there and nowhere else."""
    for call, write in layers:
        updating = [s for s, code in enumerate(codes) if write in code]
        calling = [s for s, code in enumerate(codes) if f"{call}(" in code]
        assert len(calling) == 1 and updating == calling, (call, updating, calling)


def stage_codes(program_dir) -> list[str]:
    return [p.read_text() for p in sorted(program_dir.glob("stage_*.py"))]


def trains_as_eager(program_dir, steps: int = 3, rtol: float | None = None):
    """verify_in_process's comparison, held to the bar with bitwise first-step losses."""
    result = verify_in_process(load_program(program_dir), steps=steps, rtol=rtol)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal
    return result


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_autocast_regions_run_on_every_stage_they_span(tmp_path, stages):
    # The whole stack of blocks is one autocast region with a float32 softmax nested in each: cut
    # anywhere, each stage enters the regions its share of the nodes ran inside.
    program_dir = compile_to(tmp_path, "tests/fixtures/autocast_regions.py:model", stages, microbatches=4)
    codes = stage_codes(program_dir)
    assert sum('with torch.autocast("cpu", dtype=torch.bfloat16):' in code for code in codes) == stages
    assert all("enabled=False" in code for code in codes[:-1])  # every stage holding a block
    trains_as_eager(program_dir, rtol=1e-5)  # float32's bar, though the blocks compute in bfloat16


def test_dtypes_read_inside_an_autocast_region_are_the_regions(tmp_path):
    # Meta tensors ignore autocast: `h.to(input_dtype)` in HF's RMSNorm was written as a cast to
    # float32, and the mask's `torch.finfo(scores.dtype).min` as float32's, where eager has bfloat16.
    program_dir = compile_to(tmp_path, "tests/fixtures/autocast_regions.py:dtypes_read", 2, microbatches=4)
    code = "\n".join(stage_codes(program_dir))
    assert ".to(torch.bfloat16)" in code and ".to(torch.float32)  # [b, 8, 32] float32" in code
    assert f"* {torch.finfo(torch.bfloat16).min!r}" in code
    # The blocks compute in bfloat16: gradients summed in another order across a cut round a
    # bfloat16 value an ulp apart, so the bar is bfloat16's.
    result = trains_as_eager(program_dir)
    assert result.precision == torch.bfloat16
    # Under AdamW the key biases, whose gradient softmax cancels, hold bfloat16's rounding noise,
    # which the noise rule holds at that precision's share: they failed the bar at float32's.
    adamw = verify_in_process(load_program(program_dir), steps=3, optimizer="adamw")
    assert adamw.ok and adamw.noisy_entries, "\n".join(adamw.lines())


def test_autocast_for_the_tensors_device_type_is_for_the_device_compiled_for(tmp_path):
    """torch.autocast(x.device.type, ...) was refused (traced, x.device is a node); it is the
    autocast of the device type the program is compiled for."""
    ref = "tests/fixtures/autocast_regions.py:own_device"
    program_dir = compile_to(tmp_path, ref, 2, microbatches=4)
    region = 'with torch.autocast("cpu", dtype=torch.bfloat16):'
    assert all(region in code for code in stage_codes(program_dir))
    trains_as_eager(program_dir, rtol=1e-5)
    for_gpus = compile_to(tmp_path / "h100", ref, 2, microbatches=4, device_profile="h100")
    assert all(region.replace("cpu", "cuda") in code for code in stage_codes(for_gpus))


def test_autocast_regions_recompute_as_they_ran(tmp_path):
    # Under a budget that recomputes blocks, checkpoint's recompute enters the regions again.
    ref = "tests/fixtures/autocast_regions.py:model"
    plain = compile_to(tmp_path / "plain", ref, 2, microbatches=4)
    peaks = [m["total"] for m in json.loads((plain / "program.json").read_text())["costs"]["memory"]]
    program_dir = compile_to(
        tmp_path / "tight", ref, 2, microbatches=4, memory_per_device=int(0.8 * max(peaks))
    )
    methods = [c.split("def _recompute_", 1)[-1] for c in map(Path.read_text, program_dir.glob("stage_*.py"))]
    assert any("with torch.autocast(" in m for m in methods if m)
    trains_as_eager(program_dir, steps=2, rtol=1e-5)


@pytest.mark.parametrize("stages", [2, 4, 6])
def test_item_assignment_trains_like_eager(tmp_path, stages):
    program_dir = compile_to(tmp_path, "tests/fixtures/item_assignment.py:model", stages, microbatches=6)
    codes = stage_codes(program_dir)
    assert "[:, :2] = 0.0" in "".join(codes)
    # The queue is read (shifted) and written on one stage only.
    assert [("self.queue" in code) for code in codes].count(True) == 1
    assert trains_as_eager(program_dir).max_buffer_difference <= 1e-6


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("factory", ["model", "with_data"])
def test_inputs_given_by_name_train_like_eager(tmp_path, factory, stages):
    # {"input_ids": ..., "attention_mask": ..., "labels": ...}: the program's inputs in forward's
    # order, the two between them left at their defaults; the data function's batches are dicts.
    program_dir = compile_to(tmp_path, f"tests/fixtures/keyword_inputs.py:{factory}", stages, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    assert [i["name"] for i in program["inputs"]] == ["input_ids", "attention_mask", "labels"]
    trains_as_eager(program_dir)


@pytest.mark.parametrize("factory", ["positional_none", "keyword_none"])
def test_inputs_given_as_none_train_like_eager(tmp_path, factory):
    # model(ids, None, labels), or a batch dict holding attention_mask: None: the mask is traced as
    # None (forward has no default for it in positional_none), so it is no input of the program, and
    # each batch's None is checked and passed over; the eager reference gets None.
    program_dir = compile_to(tmp_path, f"tests/fixtures/keyword_inputs.py:{factory}", 2, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    assert [i["name"] for i in program["inputs"]] == ["input_ids", "labels"]
    assert "attention_mask" not in "".join(stage_codes(program_dir))
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize(
    "factory",
    ["mixture_density", "margin_losses", "orthogonal_weights"],
)
def test_torch_code_that_reads_values_on_meta_trains_like_eager(tmp_path, factory, stages):
    # torch.distributions' argument checks are left out of the trace (they only raise); a backward
    # with no meta kernel is costed on CPU zeros; a model whose construction reads values is built
    # on CPU and moved to meta.
    ref = f"tests/fixtures/library_value_checks.py:{factory}"
    trains_as_eager(compile_to(tmp_path, ref, stages, microbatches=4))


@pytest.mark.parametrize("factory", ["metrics", "queue_counter"])
def test_what_forward_does_after_the_loss_stays_on_the_last_stage(tmp_path, factory):
    # Cheap work after the loss once got a stage of its own at K=4 (the cuts fell after the loss),
    # and the compile was refused: "the loss cross_entropy must be computed by the last stage".
    program_dir = compile_to(tmp_path, f"tests/fixtures/after_the_loss.py:{factory}", 4, microbatches=4)
    assert "cross_entropy(" in stage_codes(program_dir)[-1]
    trains_as_eager(program_dir)


def test_a_python_draw_every_value_decides_alike_traces(tmp_path):
    # LayerDrop at rate 0: `random.uniform(0, 1) > 0.0` keeps every layer whatever is drawn. At
    # 0.5 the one draw made while tracing would have decided every step: refused (test_cli).
    program_dir = compile_to(tmp_path, "tests/fixtures/untraceable.py:layer_drop_off", 2, microbatches=4)
    assert sum(code.count("torch.tanh(") for code in stage_codes(program_dir)) == 4
    trains_as_eager(program_dir)


def test_a_tied_head_stays_tied_where_the_model_is_built_on_cpu_first(tmp_path):
    # Built on CPU (its orthogonal layer reads its weight) and moved to meta, the head and the
    # embedding became two tensors: the program trained two copies, 0.87 apart in gradient.
    program_dir = compile_to(
        tmp_path, "tests/fixtures/library_value_checks.py:tied_orthogonal", 2, microbatches=4
    )
    tied = json.loads((program_dir / "program.json").read_text())["tied_parameters"]
    assert [sorted(group["parameters"]) for group in tied] == [["embed.weight", "head.weight"]]
    trains_as_eager(program_dir)


def test_a_loss_module_built_in_forward_is_traced_through(tmp_path):
    # `loss_fct = nn.CrossEntropyLoss()` in forward, as Hugging Face writes it, is in no module's
    # tree: fx refused it ("module is not installed as a submodule").
    program_dir = compile_to(tmp_path, "tests/fixtures/losses.py:loss_built_in_forward", 2, microbatches=4)
    assert "cross_entropy(" in stage_codes(program_dir)[-1]
    trains_as_eager(program_dir)


@pytest.mark.parametrize("factory", ["compiled_blocks", "scripted_blocks"])
def test_compiled_and_scripted_submodules_train_as_eager(tmp_path, factory):
    # torch.compile's wrapper was traced into its dynamo frame and refused; a TorchScript module,
    # which has no Python forward, crashed the tracer.
    program_dir = compile_to(tmp_path, f"tests/fixtures/wrapped_modules.py:{factory}", 2, microbatches=4)
    names = json.loads((program_dir / "program.json").read_text())["stages"][0]["parameters"]
    assert "blocks.0.fc1.weight" in names and not any("_orig_mod" in n for n in names)
    trains_as_eager(program_dir)


def test_the_models_own_checkpoint_calls_are_traced_through_and_said(tmp_path):
    # Hugging Face's gradient checkpointing: the stages save what the layers save without it (the
    # compiler recomputes where --memory-per-device asks), and the report says so.
    program_dir = compile_to(
        tmp_path, "tests/fixtures/wrapped_modules.py:checkpointed_blocks", 2, microbatches=4
    )
    assert (
        "the model's own torch.utils.checkpoint calls (3) are traced through"
        in (program_dir / "report.md").read_text()
    )
    trains_as_eager(program_dir)


def test_a_distribution_sampled_in_forward_trains_as_eager_given_the_same_draw(tmp_path, monkeypatch):
    # Normal(mu, std).rsample() sizes its draw with torch.Size of a traced batch shape, which fx
    # refused ("make control flow independent of tensor values"). The draw itself comes from each
    # stage's own stream, so eager and the program are compared with it fixed on both sides.
    program_dir = compile_to(
        tmp_path, "tests/fixtures/library_value_checks.py:reparameterised", 2, microbatches=4
    )
    assert ".normal_()" in "\n".join(stage_codes(program_dir))
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *args, **kwargs: self.fill_(0.25))
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("factory", ["frozen_backbone", "alternate_blocks_frozen", "lora"])
def test_fine_tuning_with_frozen_parameters_trains_like_eager(tmp_path, factory, stages):
    # The frozen parameters stay as eager leaves them (verify compares every parameter after the
    # steps). Before the trained head, nothing needs a gradient: no gradient is sent back to them.
    program_dir = compile_to(tmp_path, f"tests/fixtures/fine_tuning.py:{factory}", stages, microbatches=4)
    if factory == "frozen_backbone":
        boundaries = json.loads((program_dir / "program.json").read_text())["boundaries"]
        assert not any(b["requires_grad"] for b in boundaries)
    trains_as_eager(program_dir)


def test_a_frozen_tied_parameter_stays_as_it_was_under_adamw(tmp_path):
    # The tied groups' reduction once gave it a zero gradient, which AdamW's weight decay moves.
    program_dir = compile_to(
        tmp_path, "tests/fixtures/fine_tuning.py:tied_frozen_embedding", 2, microbatches=4
    )
    assert json.loads((program_dir / "program.json").read_text())["tied_parameters"]
    program = load_program(program_dir)
    result = verify_in_process(program, steps=3, optimizer="adamw", lr=1e-2)
    assert result.ok, "\n".join(result.lines())
    pipeline = InProcessPipeline(program, seed=0, optimizer="adamw", lr=1e-2)
    before = {n: p.detach().clone() for n, p in pipeline.named_parameters().items() if not p.requires_grad}
    pipeline.step(next(batches(program, pipeline.spec, 0)))
    after = pipeline.named_parameters()
    assert before and all(torch.equal(after[n], value) for n, value in before.items())


@pytest.mark.parametrize("factory", ["detached_features", "pseudo_labels"])
def test_a_value_no_gradient_reaches_leaves_its_stage_without_gradients(tmp_path, factory):
    """The backbone's output crosses the cut but the loss's gradient never reaches it (detached, or
    read through argmax): the cut sends nothing back, so the backbone's gradients stay None as in
    eager. A zero gradient sent back once gave them zeros, which AdamW's weight decay moved."""
    program_dir = compile_to(tmp_path, f"tests/fixtures/fine_tuning.py:{factory}", 2, microbatches=4)
    boundaries = json.loads((program_dir / "program.json").read_text())["boundaries"]
    assert boundaries and not any(b["requires_grad"] for b in boundaries)
    program = load_program(program_dir)
    result = verify_in_process(program, steps=3, optimizer="adamw", lr=1e-2)
    assert result.ok and result.max_parameter_difference == 0.0, "\n".join(result.lines())
    pipeline = InProcessPipeline(program, seed=0, optimizer="adamw", lr=1e-2)
    pipeline.step(next(batches(program, pipeline.spec, 0)))
    gradients = pipeline.named_gradients()
    assert gradients["inp.weight"] is None and gradients["blocks.0.1.weight"] is None


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize(
    "factory, names",
    [
        ("batch_dict", ["batch_input_ids", "batch_attention_mask", "batch_labels"]),
        ("batch_dict_bare", ["batch_input_ids", "batch_attention_mask", "batch_labels"]),
        ("batch_list", ["batch_0", "batch_1", "batch_2"]),
        ("batch_named_tuple", ["batch_input_ids", "batch_attention_mask", "batch_labels"]),
    ],
)
def test_a_batch_given_as_one_dict_or_list_trains_like_eager(tmp_path, factory, names, stages):
    # forward(self, batch) reads batch["input_ids"], ... unpacks a list, or reads a named tuple's
    # fields: each entry is an input of the program, loaded by the ranks that read it; the eager
    # reference gets the dict, list or named tuple.
    program_dir = compile_to(tmp_path, f"tests/fixtures/keyword_inputs.py:{factory}", stages, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    assert [i["name"] for i in program["inputs"]] == names
    assert f"def forward(self, {names[0]}" in stage_codes(program_dir)[0]
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 4])
def test_llama_style_rotary_trains_like_eager(tmp_path, stages):
    # reshape(*x.shape[:-1], -1, 2) unpacks the shape's rank. The complex frequencies are a slice
    # of a buffer forward never writes: each stage slices its own copy, nothing complex is sent.
    program_dir = compile_to(tmp_path, "tests/fixtures/llama_rotary.py:model", stages, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    assert {b["dtype"] for b in program["boundaries"]} == {"float32"}
    codes = stage_codes(program_dir)
    slicing = [code for code in codes if "freqs[:getitem]" in code]
    assert len(slicing) >= 2 and len(slicing) == sum("self.freqs" in code for code in codes)
    assert "reshape(getitem_" in codes[0]
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [3, 6])
def test_complex_activations_cross_cuts_with_their_gradients(tmp_path, stages):
    program_dir = compile_to(
        tmp_path, "tests/fixtures/complex_spectral.py:model", stages, microbatches=stages
    )
    program = json.loads((program_dir / "program.json").read_text())
    assert any(b["dtype"] == "complex64" and b["requires_grad"] for b in program["boundaries"])
    trains_as_eager(program_dir)


def test_a_python_complex_constant_is_written_into_the_stage(tmp_path):
    # `1j * a_imag` (S4D): the stage file could not hold the constant 1j, and the compile was refused.
    program_dir = compile_to(tmp_path, "tests/fixtures/complex_spectral.py:diagonal", 2, microbatches=4)
    assert "complex(0.0, 1.0) * " in "\n".join(stage_codes(program_dir))
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("factory", ["constants", "penalised", "plain_mask"])
def test_constants_and_parameter_penalties_train_like_eager(tmp_path, factory, stages):
    # Constants are made again where used; a penalty over self.parameters() reads every parameter
    # on the loss's stage, so their gradients include it (tied across the stages holding them).
    ref = f"tests/fixtures/constants_and_penalties.py:{factory}"
    program_dir = compile_to(tmp_path, ref, stages, microbatches=4)
    code = "".join(stage_codes(program_dir))
    assert "_tensor_constant" not in code
    if factory == "constants":
        assert "torch.tensor([1.0, 2.0, 0.5], dtype=torch.float32)" in code
    trains_as_eager(program_dir)


def test_a_buffer_read_first_and_written_last_holds_its_span_on_one_stage(tmp_path):
    # The running mean is read by the first node and written after the last layer: the report
    # says why no cut falls between, and asking for more stages than the rest allows says so too.
    ref = "tests/fixtures/buffer_assign.py:normalised_inputs"
    program_dir = compile_to(tmp_path / "two", ref, 2, microbatches=4)
    program = load_program(program_dir)
    notes = " ".join(program.data["costs"]["notes"])
    assert "buffer `mean` is read by `sub` and written by `lerp_`" in notes
    result = verify_in_process(program, steps=3)
    assert result.ok, "\n".join(result.lines())
    assert result.worst_buffer == "mean" and result.max_buffer_difference <= 1e-6
    with pytest.raises(CompileError, match="buffer `mean` is read by `sub`"):
        compile_to(tmp_path / "four", ref, 4, microbatches=4)


@pytest.mark.parametrize("stages", [2, 3])
def test_inputs_left_at_their_defaults_train_like_eager(tmp_path, stages):
    # Traced as placeholders, `mask=None` would be a Proxy and `if mask is not None` would multiply
    # by None; the program must take eager's branches and drop the inputs the factory did not give.
    program_dir = compile_to(tmp_path, "tests/fixtures/unseen_defaults.py:model", stages, microbatches=4)
    assert [i["name"] for i in load_program(program_dir).data["inputs"]] == ["x", "y"]
    code = "".join(stage_codes(program_dir))
    assert "mask" not in code and "_assert" not in code
    trains_as_eager(program_dir)


@pytest.mark.parametrize("stages", [2, 3])
def test_buffers_assigned_in_forward_train_like_eager(tmp_path, stages):
    program_dir = compile_to(tmp_path, "tests/fixtures/buffer_assign.py:model", stages, microbatches=4)
    code = "".join(p.read_text() for p in sorted(program_dir.glob("stage_*.py")))
    assert code.count("  # the model rebinds its buffer") == 7  # the step counter, six moving averages
    result = verify_in_process(load_program(program_dir), steps=3)
    assert result.ok, "\n".join(result.lines())
    assert result.worst_buffer is not None and result.max_buffer_difference <= 1e-5
