"""Ints from shapes (``B, T, C = x.shape``) cross cuts without being sent: each stage that uses
one computes it from the micro-batch's sizes, at whatever sizes the micro-batch has."""

import torch

from ppcompile.check_training import verify_in_process
from ppcompile.context import CompileConfig
from ppcompile.driver import compile_model
from ppcompile.passes.partition_stages import compute_order, partition_problem
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.train import InProcessPipeline, build_spec
from tests.helpers import build_model, chained_forward, compile_to

LATE = "tests/fixtures/shape_ints.py:late_shapes"
DEVICE_LATE = "tests/fixtures/shape_ints.py:device_late"
DROP_FIRST = "tests/fixtures/shape_ints.py:drop_first"


def test_ints_made_after_the_embedding_reach_the_last_stage_from_the_sizes_and_train_as_eager(tmp_path):
    program = load_program(compile_to(tmp_path, LATE, 3))
    sizes = {spec["name"]: (spec["kind"], spec["value"]) for spec in program.stage(2)["sizes"]}
    # B, T - 1, the torch.Size and the 1/sqrt(C) scale, each as the micro-batch's sizes fix it.
    assert ("int", "b") in sizes.values() and ("int", "s - 1") in sizes.values()
    assert ("torch.Size", ["b", "s", "32"]) in sizes.values()
    assert ("constant", 1 / 32**0.5) in sizes.values()
    # None of them is a boundary: nothing sends an int.
    assert not set(sizes) & {b["name"] for b in program.data["boundaries"]}
    result = verify_in_process(program, steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())
    assert result.max_gradient_difference == 0.0


def test_the_ints_follow_each_micro_batch_not_the_example(tmp_path):
    program_dir = compile_to(tmp_path, LATE, 3)
    model, _ = build_model(LATE)
    # Another batch size and sequence length than the example's (4, 16).
    idx, targets = torch.randint(0, 64, (3, 11)), torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        assert torch.equal(chained_forward(program_dir, model, (idx, targets)), model(idx, targets))


def test_factories_given_a_size_computed_from_a_shape_follow_each_micro_batch(tmp_path):
    """torch.ones(x.shape[:-1] + (1,)) and torch.zeros(x.shape[:-1]) were refused: the size, already
    a tuple, was packed into another tuple."""
    ref = "tests/fixtures/shape_ints.py:sized_factories"
    program_dir = compile_to(tmp_path, ref, 3)
    model, _ = build_model(ref)
    idx, targets = torch.randint(0, 64, (3, 11)), torch.randint(0, 64, (3, 11))
    with torch.no_grad():
        assert torch.equal(chained_forward(program_dir, model, (idx, targets)), model(idx, targets))
    result = verify_in_process(load_program(program_dir), steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())


def test_a_device_taken_from_a_hidden_state_still_forbids_the_cuts_it_spans():
    result = compile_model(LATE, CompileConfig(stages=1))
    order = compute_order(result.gm)
    _, _, forbidden = partition_problem(result.gm, None, order, weight=lambda node: 0.0)
    assert not forbidden, "ints, a torch.Size and a float constant forbid no cut"
    device = compile_model(DEVICE_LATE, CompileConfig(stages=1)).gm
    order = compute_order(device)
    _, _, forbidden = partition_problem(device, None, order, weight=lambda node: 0.0)
    position = {node.name: i for i, node in enumerate(order)}
    made = next(n for n in order if n.op == "call_function" and n.target is getattr and n.args[1] == "device")
    assert "ppc.value" not in made.meta
    assert forbidden == set(range(position[made.name] + 1, max(position[u.name] for u in made.users) + 1))


def test_a_dim_one_shorter_than_the_sequence_crosses_cuts_at_any_sequence_length(tmp_path):
    program = load_program(compile_to(tmp_path, DROP_FIRST, 3, microbatches=4))
    # Rows of b*(s - 1) after the reshape by B * T: the dims of what crosses are symbolic too.
    assert {tuple(b["shape"]) for b in program.data["boundaries"]} == {
        ("b*(s - 1)", "32"),
        ("b*(s - 1)", "64"),
    }
    sizes = [(spec["kind"], spec["value"]) for spec in program.stage(2)["sizes"]]
    assert ("torch.Size", ["b", "s - 1", "32"]) in sizes and ("int", "s - 2") in sizes
    # The runtime sizes every message at each micro-batch's own shape: (3, 11), not the example's
    # (4, 16), through the receive buffers of the forward-only schedule.
    pipeline = InProcessPipeline(program)
    model = build_spec(program, 0).module
    generator = torch.Generator().manual_seed(1)
    microbatches = [
        {
            "idx": torch.randint(0, 64, (3, 11), generator=generator),
            "targets": torch.randint(0, 64, (3, 11), generator=generator),
        }
        for _ in range(4)
    ]
    with torch.no_grad():
        expected = [float(model(mb["idx"], mb["targets"])) for mb in microbatches]
    assert pipeline.evaluate(microbatches) == expected


def test_hugging_face_gpt2s_output_shape_spans_the_model_and_cuts_still_fall_between_blocks(tmp_path):
    # output_shape = (-1,) + input_shape[1:] + (h.size(-1),), made before the first block and read
    # after the last: a torch.Size joined from sizes and a literal, computed where it is used.
    program_dir = compile_to(tmp_path, "tests/fixtures/hf_gpt2.py:model", 2, microbatches=4)
    program = load_program(program_dir)
    sizes = {spec["name"]: (spec["kind"], spec["value"]) for spec in program.stage(1)["sizes"]}
    assert ("torch.Size", ["-1", "s", "32"]) in sizes.values(), sizes
    times = [s["compute_seconds"] for s in program.data["costs"]["stages"]]
    assert max(times) / (sum(times) / 2) < 1.05  # before: everything but the head on stage 0, 1.93
    model, _ = build_model("tests/fixtures/hf_gpt2.py:model")
    idx = torch.randint(0, 50, (3, 9))  # another batch size and length than the example's (4, 12)
    with torch.no_grad():
        assert torch.equal(chained_forward(program_dir, model, (idx, idx)), model(idx, idx)[0])
    result = verify_in_process(program, steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal
