"""``ppcompile verify`` compares buffers, and switches dropout off on both sides, saying so."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppcompile.check_training import (
    NoiseHeld,
    compare,
    dropout_switched_off,
    eager_training,
    verify_in_process,
)
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.train import InProcessPipeline, batches
from tests.fixtures.torch_encoder import sequence_pairs
from tests.helpers import assert_user_error, build_model, compile_to, ppcompile

BATCHNORM = "tests/fixtures/verify_batchnorm.py:model"
DROPOUT = "tests/fixtures/verify_dropout.py:model"
NOISY = "tests/fixtures/verify_dropout.py:noisy"
STEPS, MICROBATCHES = 2, 4


@pytest.fixture(scope="module")
def batchnorm_program(tmp_path_factory):
    return compile_to(tmp_path_factory.mktemp("bn"), BATCHNORM, 2, microbatches=MICROBATCHES)


def test_every_batchnorm_buffer_is_compared_with_eager(batchnorm_program):
    program = load_program(batchnorm_program)
    result = verify_in_process(program, steps=STEPS, lr=0.05)
    assert result.ok, "\n".join(result.lines())
    # The same operations in the same order per micro-batch: the running statistics match bitwise.
    assert result.max_buffer_difference == 0.0 and result.worst_buffer is not None
    assert f"largest buffer difference after step {STEPS}: 0.00e+00 ({result.worst_buffer})" in result.lines()
    # The ranks hold every buffer of the eager model between them, each one rank's only.
    eager = eager_training(program, STEPS, "sgd", 0.05, 0)
    held = InProcessPipeline(program).named_buffers()
    assert set(held) == set(eager.buffers) and all(len(copies) == 1 for copies in held.values())
    assert {r for copies in held.values() for r in copies} == {0, 1}
    # Each micro-batch's forward counted once: the check is not comparing untouched buffers.
    assert eager.buffers["blocks.3.bn.num_batches_tracked"].item() == STEPS * MICROBATCHES


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_a_running_statistic_read_outside_its_layer_is_the_one_the_layer_left(tmp_path, stages):
    # Read as an attribute after the layer's call, the statistic would come from the reading
    # rank's own copy, which only the layer's rank updates: the read takes a copy made beside the
    # call instead, sent like any other value; the read before the first call stays beside it.
    program_dir = compile_to(tmp_path, "tests/fixtures/verify_batchnorm.py:statistics_read", stages)
    program = load_program(program_dir)
    codes = [(program_dir / f"stage_{s}.py").read_text() for s in range(stages)]
    held = [code for code in codes if "'bn'," in code]
    assert len(held) == 1 and "= torch.clone(bn_running_mean)" in held[0]
    assert "bn.running" not in "".join(code for code in codes if code not in held)
    result = verify_in_process(program, steps=3)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal


def _corrupt_after_step(monkeypatch, name: str, change):
    """Every pipeline step then changes the buffer ``name`` on whichever rank holds it."""
    step = InProcessPipeline.step

    def corrupted_step(self, *args, **kwargs):
        losses = step(self, *args, **kwargs)
        for buffer in self.named_buffers()[name].values():
            change(buffer)
        return losses

    monkeypatch.setattr(InProcessPipeline, "step", corrupted_step)


@pytest.mark.parametrize(
    "name,change,line",
    [
        # A 1e-4 relative error in a running variance: ten times the bar.
        (
            "blocks.2.bn.running_var",
            lambda b: b.mul_(1 + 1e-4),
            "(blocks.2.bn.running_var)",
        ),
        # One forward counted twice, as a recomputed BatchNorm would.
        (
            "blocks.0.bn.num_batches_tracked",
            lambda b: b.add_(1),
            ": 2 (blocks.0.bn.num_batches_tracked, an integer buffer: must be equal)",
        ),
    ],
)
def test_a_buffer_that_drifts_from_eager_fails_verify(batchnorm_program, monkeypatch, name, change, line):
    _corrupt_after_step(monkeypatch, name, change)
    result = verify_in_process(load_program(batchnorm_program), steps=STEPS, lr=0.05)
    assert not result.ok and not result.buffers_agree
    assert result.worst_buffer == name
    # Parameters do not read the running statistics in training: only the buffer line shows it.
    assert result.max_parameter_difference <= result.rtol
    assert (
        result.lines()[-1].startswith(f"largest buffer difference after step {STEPS}")
        and line in result.lines()[-1]
    )
    assert result.verdict() == "FAILED: outside the bar"


def test_cli_prints_the_buffer_line_and_no_random_note_without_dropout(batchnorm_program):
    result = ppcompile("verify", batchnorm_program, "--steps", STEPS)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # Trained with the optimizer the program was compiled for, as run.py trains it.
    assert (
        lines[0] == f"{STEPS} steps with adamw (the optimizer compiled for), lr 0.01, beside the eager model"
    )
    assert lines[1].startswith("first-step losses bitwise equal: True")  # no note about random numbers
    assert "random" not in result.stdout
    assert f"largest buffer difference after step {STEPS}: 0.00e+00" in lines[-2]
    assert lines[-1] == "OK: the compiled program trains as the eager model"


def test_a_model_without_buffers_prints_no_buffer_line(tmp_path):
    result = verify_in_process(load_program(compile_to(tmp_path, "models/mlp.py:mlp", 2)), steps=STEPS)
    assert result.ok and result.worst_buffer is None
    assert not any("buffer" in line for line in result.lines())


def test_switched_off_dropout_is_the_identity_and_draws_nothing():
    """Against eager PyTorch: in training mode, with dropout switched off, the model computes what it
    computes in eval mode (where nn.Dropout and F.dropout(..., self.training) are the identity)."""
    model, (x, y) = build_model(DROPOUT)
    expected = model.eval()(x, y)
    model.train()
    original = F.dropout
    state = torch.get_rng_state()
    with dropout_switched_off() as dropped:
        assert torch.equal(model(x, y), expected)
    assert torch.equal(torch.get_rng_state(), state)
    assert dropped == ["dropout"] * 5  # four nn.Dropout modules and the functional one
    assert F.dropout is original  # restored on the way out
    assert not torch.equal(model(x, y), expected)  # and dropping again


def test_dropout_model_verifies_with_dropout_switched_off_on_both_sides(tmp_path):
    program_dir = compile_to(tmp_path, DROPOUT, 2, microbatches=MICROBATCHES)
    result = ppcompile("verify", program_dir, "--steps", STEPS)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()[1:]
    assert lines[0] == (
        "the model draws random numbers (Dropout in blocks.0.drop, blocks.1.drop, blocks.2.drop and 1 more; "
        "torch.nn.functional.dropout in stage 1): compared with them switched off on both sides, since each "
        "stage draws from a stream of its own, not eager's"
    )
    assert lines[1] == "first-step losses bitwise equal: True"
    assert lines[-1] == "OK: the compiled program trains as the eager model"


def test_attention_dropout_is_switched_off_on_both_sides(tmp_path):
    """nn.TransformerEncoderLayer at its default dropout drops attention weights inside
    scaled_dot_product_attention, which draws its own mask: verify failed such correct programs."""
    program_dir = compile_to(
        tmp_path, "tests/fixtures/verify_dropout.py:attention", 2, microbatches=MICROBATCHES
    )
    result = ppcompile("verify", program_dir, "--steps", STEPS)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()[1:]
    assert lines[0].startswith(
        "the model draws random numbers (MultiheadAttention in encoder.0.self_attn, encoder.1.self_attn; "
        "Dropout in encoder.0.dropout, "
    )
    assert (
        "torch._C._nn.scaled_dot_product_attention in stage 1): compared with them switched off" in lines[0]
    )
    assert lines[1] == "first-step losses bitwise equal: True"


def test_recurrent_dropout_between_layers_is_switched_off_on_both_sides(tmp_path):
    """nn.LSTM(num_layers=2, dropout=0.3) drops inside its kernel, not through F.dropout: verify
    failed such correct programs, naming "an op verify cannot name"."""
    program_dir = compile_to(
        tmp_path, "tests/fixtures/verify_dropout.py:recurrent", 2, microbatches=MICROBATCHES
    )
    result = verify_in_process(load_program(program_dir), steps=STEPS)
    assert result.ok, "\n".join(result.lines())
    assert result.random_ops_switched_off == ("LSTM in lstm", "GRU in gru")
    assert result.first_step_losses_equal


def test_switched_off_recurrent_dropout_is_the_identity_packed_or_not():
    """Against eager PyTorch in eval mode, where stacked recurrent layers do not drop."""
    lstm = nn.LSTM(4, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2])
    expected = [lstm.eval()(x)[0], lstm(packed)[0].data]
    lstm.train()
    with dropout_switched_off() as dropped:
        assert torch.equal(lstm(x)[0], expected[0])
        assert torch.equal(lstm(packed)[0].data, expected[1])
    assert dropped == ["nn.LSTM", "nn.LSTM"]
    assert not torch.equal(lstm(x)[0], expected[0])  # and dropping again


def test_a_batch_giving_an_input_the_example_leaves_out_is_one_line(tmp_path):
    """The program was compiled without attention_mask: it trained as if no token were padding, and
    verify, whose eager model took the same inputs, passed."""
    program_dir = compile_to(tmp_path, "tests/fixtures/keyword_inputs.py:data_gives_mask", 2, microbatches=2)
    assert_user_error(
        ppcompile("verify", program_dir, "--steps", 1),
        "error: the data function's batch gives 'attention_mask', which forward takes but the example "
        "inputs leave out, so the program was compiled without it; give it in the example inputs too, or "
        "leave it out of the batch",
    )


def test_a_batch_giving_an_input_the_example_gives_as_none_is_one_line(tmp_path):
    program_dir = compile_to(tmp_path, "tests/fixtures/keyword_inputs.py:data_fills_none", 2, microbatches=2)
    assert_user_error(
        ppcompile("verify", program_dir, "--steps", 1),
        "error: the data function's batch gives 'attention_mask', which ",
    )


def test_adaptive_optimizers_move_rounding_noise_gradients_by_their_sign(tmp_path, monkeypatch):
    """The attention's key bias has a gradient that is zero but for rounding; AdamW moves it a full
    step of the rounding's sign, which two correct runs (the tied embedding's gradient summed in
    another order) disagree on. Those entries are held to the optimizer's step size."""
    program = load_program(
        compile_to(tmp_path, "tests/fixtures/torch_transformer.py:shared_embedding", 4, microbatches=4)
    )
    result = verify_in_process(program, steps=3, optimizer="adamw", lr=1e-3)
    assert result.ok and result.noisy_entries > 0, "\n".join(result.lines())
    assert "entries whose gradient is rounding noise" in result.lines()[-1]
    monkeypatch.setattr("ppcompile.check_training.NOISE_STEP", {})
    strict = verify_in_process(program, steps=3, optimizer="adamw", lr=1e-3)
    assert not strict.ok and "in_proj_bias" in strict.worst_parameter
    # SGD moves such an entry by lr x the noise: nothing to hold apart.
    assert verify_in_process(program, steps=3, optimizer="sgd", lr=0.05).noisy_entries == 0


def test_what_reads_a_rounding_noise_entry_is_held_to_the_bar_under_adamw(tmp_path, monkeypatch):
    """A bias before a BatchNorm in a backbone run twice per forward: AdamW moves its noise
    gradient's entries by a step of the noise's sign, differently in eager and on the pipeline's
    rank, and the running mean reads the bias. The noise entries are set equal after each step, so
    the running mean and the next step's loss are held to the bar, not left to drift apart."""
    program = load_program(
        compile_to(tmp_path, "tests/fixtures/verify_batchnorm.py:two_views", 2, microbatches=4)
    )
    result = verify_in_process(program, steps=3, optimizer="adamw", lr=1e-2)
    assert result.ok and result.noisy_entries > 0, "\n".join(result.lines())
    assert result.worst_buffer is not None and result.max_buffer_difference <= 1e-5
    monkeypatch.setattr("ppcompile.check_training.NOISE_STEP", {})
    drifting = verify_in_process(program, steps=3, optimizer="adamw", lr=1e-2)
    assert not drifting.ok and "running_mean" in drifting.worst_buffer, "\n".join(drifting.lines())


def test_a_noise_entry_moved_past_two_optimizer_steps_fails():
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[1.0, 0.0]])  # the second entry's gradient is noise (zero)
    model.bias.grad = torch.tensor([0.5])
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved["weight"][0, 1] += 0.3  # three steps of 0.1 from eager's
    held = NoiseHeld([moved], step_size=0.1)
    held(0, model)
    assert held.entries == 1 and held.steps_apart == pytest.approx(3.0)
    assert torch.equal(model.weight.detach(), moved["weight"])  # set to the pipeline's
    comparison = compare([[1.0]], {}, {}, ([[1.0]], {}, {}))
    assert comparison.ok and not replace(comparison, noise_steps_apart=held.steps_apart).ok


def test_dropout_the_factory_runs_is_not_the_forwards(tmp_path):
    # The factory ran the model in training mode before returning it in eval mode: that dropout
    # ran while verify built the models, not in forward, which draws nothing to switch off.
    program = load_program(
        compile_to(tmp_path, "tests/fixtures/verify_dropout.py:evaluated", 2, microbatches=2)
    )
    result = verify_in_process(program, steps=2)
    assert result.ok and result.random_ops_switched_off == (), "\n".join(result.lines())


def test_a_random_op_verify_cannot_switch_off_is_named_beside_the_failure(tmp_path):
    program = load_program(compile_to(tmp_path, NOISY, 2, microbatches=MICROBATCHES))
    result = verify_in_process(program, steps=STEPS)
    assert result.random_ops_left_on == ("torch.bernoulli in stages 0, 1",)
    # Each stage draws the bernoulli masks from its own stream, the eager model from one generator.
    assert not result.ok and not result.first_step_losses_equal
    assert result.verdict() == (
        "FAILED: outside the bar; the difference may come from the random numbers the model draws "
        "(torch.bernoulli in stages 0, 1), which each stage draws from a stream of its own, not eager's"
    )


@pytest.mark.parametrize(
    "factory,note",
    [
        ("returns_tuple", "forward returns a tuple of 3: the program trains on its first element, the loss"),
        ("returns_dict", "forward returns a dict: the program trains on its 'loss', the loss"),
        # Its loss is third, behind a scalar: found by its key, not by the place fx flattened it to.
        (
            "returns_dict_with_tuple_default",
            "forward returns a dict: the program trains on its 'loss', the loss",
        ),
        (
            "returns_dataclass",
            "forward returns Output (a dataclass): the program trains on its loss, the loss",
        ),
        (
            "returns_named_tuple",
            "forward returns Prediction (a named tuple): the program trains on its loss, the loss",
        ),
        ("returns_one_element_loss", "the loss has shape [1]: the program trains on its one element"),
        (
            "returns_logits_first",
            "forward returns a tuple of 2: the program trains on its element 1 (the only scalar after a "
            "non-scalar), the loss",
        ),
    ],
)
def test_a_model_returning_its_loss_beside_other_values_trains_on_that_loss(tmp_path, factory, note):
    ref = f"tests/fixtures/returns_more.py:{factory}"
    program = load_program(compile_to(tmp_path, ref, 2, microbatches=MICROBATCHES))
    assert note in " ".join(program.data["costs"]["notes"])
    result = verify_in_process(program, steps=STEPS, lr=0.05)
    # verify holds the first step's losses bitwise equal to eager's, which picks its loss out of
    # forward's output by the same rule.
    assert result.ok, "\n".join(result.lines())


def test_torch_transformer_decoder_with_a_causal_mask_compiles_and_trains_as_eager(tmp_path):
    # nn.TransformerDecoder compares tgt_mask's values with a causal mask: meta tensors have none.
    ref = "tests/fixtures/torch_transformer.py:model"
    program = load_program(compile_to(tmp_path, ref, 2, microbatches=MICROBATCHES))
    result = verify_in_process(program, steps=STEPS, lr=0.05)
    assert result.ok, "\n".join(result.lines())


def test_a_bfloat16_model_is_held_to_its_own_precision(tmp_path):
    program = load_program(compile_to(tmp_path, "tests/fixtures/low_precision.py:model", 2, microbatches=4))
    result = verify_in_process(program, steps=STEPS, lr=0.05)
    assert result.ok, "\n".join(result.lines())
    assert result.precision == torch.bfloat16 and result.rtol == 2 * torch.finfo(torch.bfloat16).eps
    assert result.first_step_losses_equal  # the forward is the same operations in the same order
    assert "rtol 1.56e-02: two epsilons of bfloat16" in result.lines()[0]
    # An explicit rtol is the bar as given.
    strict = verify_in_process(program, steps=STEPS, lr=0.05, rtol=1e-5)
    assert strict.precision is None and strict.rtol == 1e-5
    # A float32 model keeps float32's bar.
    # Compiled into the same directory, in the same process: the new program's stages are loaded.
    mlp = verify_in_process(load_program(compile_to(tmp_path, "models/mlp.py:mlp", 2)), steps=1)
    assert mlp.precision is None and mlp.rtol == 1e-5


def _stage_modules(program) -> list[tuple[str, ...]]:
    return [program.stage_class(s).MODULES for s in range(program.num_stages)]


def test_torch_transformer_encoder_is_cut_between_its_layers_and_trains_as_eager(tmp_path):
    program = load_program(compile_to(tmp_path, "tests/fixtures/torch_encoder.py:gpt", 4, microbatches=4))
    modules = _stage_modules(program)
    # Each stage holds layers of the one container; none holds the container whole.
    assert not any("encoder" in held for held in modules)
    owners = {s for s, held in enumerate(modules) for name in held if name.startswith("encoder.layers.")}
    assert len(owners) >= 3
    # torch tests the mask's values once per container call; the stages test it before each layer.
    code = "".join((program.root / f"stage_{s}.py").read_text() for s in range(program.num_stages))
    assert code.count("ppcompile.runtime.masks.is_causal_mask(") == 4
    result = verify_in_process(program, steps=STEPS, lr=0.05)
    assert result.ok and result.first_step_losses_equal, "\n".join(result.lines())
    assert result.max_gradient_difference == 0.0  # the same operations in the same order


def test_a_sequence_first_model_is_split_into_microbatches_along_its_batch_dim(tmp_path):
    program = load_program(
        compile_to(tmp_path, "tests/fixtures/torch_encoder.py:sequence_first", 2, microbatches=4)
    )
    assert [i["shape"] for i in program.data["inputs"]] == [["7", "b"], ["5", "b"]]
    microbatches = next(batches(program, InProcessPipeline(program).spec, 0))
    # Micro-batch m is sequences 4m..4m+3 of the batch, whole (b = 4), not a slice of positions.
    src, tgt = next(sequence_pairs(16, 0))
    for m, microbatch in enumerate(microbatches):
        assert torch.equal(microbatch["src"], src[:, 4 * m : 4 * m + 4])
        assert torch.equal(microbatch["tgt"], tgt[:, 4 * m : 4 * m + 4])
    modules = _stage_modules(program)
    assert "transformer.encoder.layers.0" in modules[0] and "transformer.decoder.layers.1" in modules[-1]
    result = verify_in_process(program, steps=STEPS, lr=0.05)
    assert result.ok and result.first_step_losses_equal, "\n".join(result.lines())


def test_an_encoder_in_eval_mode_given_a_padding_mask_stays_whole(tmp_path):
    ref = "tests/fixtures/torch_encoder.py:padded_in_eval_mode"
    program = load_program(compile_to(tmp_path, ref, 2, microbatches=MICROBATCHES))
    assert any("encoder" in held for held in _stage_modules(program))
    result = verify_in_process(program, steps=STEPS, lr=0.05)
    assert result.ok, "\n".join(result.lines())


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_a_stream_laid_out_channel_by_channel_arrives_laid_out_so(tmp_path, stages):
    # Sent contiguous, the stream reached the next BatchNorm in another memory order than eager's,
    # which then summed in another order: gradients 1e-6 apart, and the zero-initialised attention
    # output bias, which BatchNorm cancels and so holds only rounding noise, entirely apart.
    program_dir = compile_to(tmp_path, "tests/fixtures/verify_batchnorm.py:channel_norm_stream", stages)
    program = load_program(program_dir)
    orders = {tuple(b["dim_order"]) for b in program.data["boundaries"] if "dim_order" in b}
    assert orders and orders <= {(0, 2, 1), (1, 0, 2)}  # the stream's (B, d, T); attention's (T, B, d)
    result = verify_in_process(program, steps=3)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal
    assert result.max_gradient_difference == 0.0 and result.max_parameter_difference == 0.0


def test_a_channels_last_cnn_trains_bitwise_as_eager(tmp_path):
    # Its feature maps lie pixel by pixel; sent contiguous, a convolution after a cut ran on
    # another layout than eager's, and its weight's gradient came out 2.8e-6 apart.
    program_dir = compile_to(tmp_path, "tests/fixtures/unseen_cnn_batchnorm.py:channels_last", 4)
    program = load_program(program_dir)
    assert {tuple(b.get("dim_order", ())) for b in program.data["boundaries"]} == {(0, 2, 3, 1)}
    result = verify_in_process(program, steps=2)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal and result.max_gradient_difference == 0.0


def test_a_diverging_eager_model_is_named_not_compared(tmp_path):
    # Both runs reach NaN at the same step: equal, and still nothing the bar can vouch for.
    program = load_program(compile_to(tmp_path, "models/mlp.py:mlp", 2, microbatches=4))
    result = verify_in_process(program, steps=3, lr=1e3)
    assert not result.ok and result.eager_diverged == "its loss is nan at step 2 (micro-batch 1)"
    assert result.lines()[0].startswith("the eager model itself diverges: its loss is nan at step 2")
    assert result.verdict() == "FAILED: the eager model itself diverges, so the program cannot be held to it"


def test_a_nan_cannot_hide_behind_a_finite_difference():
    # Python's max passes over a NaN that does not come first: a program whose last step left one
    # parameter (not the first) NaN would have passed.
    finite = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, float("nan")])}
    result = compare([[1.0], [float("nan")]], finite, params, ([[1.0], [1.5]], finite, finite))
    assert not result.ok and not result.eager_diverged
    assert result.max_loss_difference == result.max_parameter_difference == float("inf")
    assert result.worst_parameter == "b"
