"""Programs compiled for inference (``--schedule forward-only``): they return what forward returns,
equal to the eager model's forward, hold no gradients or optimizer state, and balance forward time."""

import json
import subprocess
import sys

import pytest
import torch

from ppcompile.check_training import _output_differences, verify_inference_in_process
from ppcompile.measure import measure_stages
from ppcompile.runtime.loader import ProgramError, load_program
from ppcompile.runtime.outputs import as_returned, joined, output_leaves
from ppcompile.runtime.spec import ModelRef, call_forward
from ppcompile.runtime.train import InProcessPipeline, batches
from tests.helpers import assert_user_error, compile_to, ppcompile, torchrun_command

FIXTURE = "tests/fixtures/inference.py"


def _eager_outputs(program, microbatches):
    spec = ModelRef.parse(f"{FIXTURE}:{program.data['model']['factory']}").build("cpu", seed=0)
    names = [i["name"] for i in program.data["inputs"]]
    with torch.no_grad():
        return [
            call_forward(spec.module, names, [mb[n] for n in names], spec.input_groups) for mb in microbatches
        ]


def _assert_bitwise_equal(got, expected):
    got_leaves, expected_leaves = output_leaves(got), output_leaves(as_returned(expected))
    assert [p for p, _ in got_leaves] == [p for p, _ in expected_leaves]
    for (path, a), (_, b) in zip(got_leaves, expected_leaves):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, path


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("factory", ["classifier", "detector", "ranker", "tagger", "tiny_lm", "checkpointed"])
def test_outputs_equal_the_eager_forward_bitwise(tmp_path, factory, stages):
    program_dir = compile_to(
        tmp_path, f"{FIXTURE}:{factory}", stages, microbatches=4, schedule="forward-only"
    )
    program = load_program(program_dir)
    assert program.data["trains"] is False
    pipeline = InProcessPipeline(program)
    microbatches = next(batches(program, pipeline.spec, 0))
    pipeline.evaluate(microbatches)
    results = pipeline.results()
    assert len(results) == 4
    for got, expected in zip(results, _eager_outputs(program, microbatches)):
        _assert_bitwise_equal(got, expected)
    comparison = verify_inference_in_process(program, steps=2)
    assert comparison.ok and comparison.outputs_bitwise_equal, comparison.lines()
    # A BatchNorm in training mode updates its statistics in inference as it does in eager.
    if factory == "tagger":
        assert comparison.worst_buffer is not None and comparison.max_buffer_difference == 0.0


def test_checkpoints_that_only_backward_would_misread_are_not_refused_for_inference(tmp_path):
    training = ppcompile("compile", f"{FIXTURE}:checkpointed", "-k", "2", "-o", tmp_path / "t")
    assert training.returncode == 2 and "rebinds `block`" in training.stderr.strip().splitlines()[-1]
    inference = ppcompile(
        "compile", f"{FIXTURE}:checkpointed", "-k", "2", "--schedule", "forward-only", "-o", tmp_path / "i"
    )
    assert inference.returncode == 0, inference.stderr


def test_a_value_made_on_the_first_stage_is_sent_to_the_last_to_be_returned(tmp_path):
    program_dir = compile_to(tmp_path, f"{FIXTURE}:classifier", 3, microbatches=4, schedule="forward-only")
    program = json.loads((program_dir / "program.json").read_text())
    embedding = next(b for b in program["boundaries"] if b["name"] == "normalize")
    assert embedding["producer"] == 0 and 2 in embedding["consumers"]
    assert [o["path"] for o in program["outputs"]] == ["output[0]", "output[1]"]
    assert program["stages"][2]["returns_output"] and not program["stages"][2]["returns_loss"]
    stage = (program_dir / "stage_2.py").read_text()
    assert 'return {"output": (head, normalize)}' in stage
    assert "output[1]: [b, 32] float32" in stage


def test_a_dataclass_or_named_tuple_is_returned_as_a_dict_of_its_fields(tmp_path):
    ranker = compile_to(tmp_path / "r", f"{FIXTURE}:ranker", 2, microbatches=2, schedule="forward-only")
    outputs = json.loads((ranker / "program.json").read_text())["outputs"]
    assert [(o["path"], o["dtype"]) for o in outputs] == [
        ("output['logits']", "float32"),
        ("output['top']", "int64"),
    ]
    program_dir = compile_to(tmp_path, f"{FIXTURE}:detector", 2, microbatches=2, schedule="forward-only")
    program = json.loads((program_dir / "program.json").read_text())
    assert [o["path"] for o in program["outputs"]] == ["output['scores']", "output['boxes']"]
    assert (
        "forward returns Detection: the program returns its fields as a dict (scores, boxes)"
        in (program["costs"]["notes"])
    )


def test_inference_holds_no_gradients_optimizer_state_or_saved_activations(tmp_path):
    training = json.loads(
        (compile_to(tmp_path / "t", f"{FIXTURE}:tiny_lm", 2).joinpath("program.json")).read_text()
    )
    inference_dir = compile_to(tmp_path / "i", f"{FIXTURE}:tiny_lm", 2, schedule="forward-only")
    inference = json.loads((inference_dir / "program.json").read_text())
    for trained, evaluated in zip(training["costs"]["memory"], inference["costs"]["memory"]):
        assert trained["gradients"] > 0 and evaluated["gradients"] == 0 and evaluated["optimizer"] == 0
        assert evaluated["parameters"] == trained["parameters"]
        assert trained["activations_per_microbatch"] > 0 and evaluated["activations_per_microbatch"] == 0
    # The last stage keeps the step's logits ([b, s, 64] float32 per micro-batch, 8 of them).
    logits = 2 * 16 * 64 * 4
    assert inference["costs"]["memory"][1]["transfers"] >= 8 * logits
    # Stages are balanced on forward time alone; the training program's include backward. The
    # attention layers return tuples, whose items need no gradient here either.
    tagger_dir = compile_to(tmp_path / "a", f"{FIXTURE}:tagger", 3, schedule="forward-only")
    tagger = json.loads((tagger_dir / "program.json").read_text())
    for stage in inference["costs"]["stages"] + tagger["costs"]["stages"]:
        assert stage["backward_seconds"] == 0 and stage["backward_flops"] == 0
    # Measured as the runtime runs it: forward alone, nothing saved for a backward.
    program = load_program(inference_dir)
    measured = measure_stages(program, repeats=1)
    assert [m.saved_bytes for m in measured] == [0, 0] and all(m.seconds > 0 for m in measured)
    report = (inference_dir / "report.md").read_text()
    assert "(inference: forward only, without autograd)" in report
    assert "| params+buffers" in report and "recomputed in backward" not in report
    assert (
        "stage 1 returns what forward returns: output['logits'] [b, s, 64] float32; output['loss'] []"
        in report
    )


def test_verify_cli_compares_outputs_and_an_output_difference_is_found(tmp_path):
    program_dir = compile_to(tmp_path, f"{FIXTURE}:tagger", 2, microbatches=2, schedule="forward-only")
    result = ppcompile("verify", program_dir, "--steps", "1")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip().splitlines()[-1]
        == "OK: the compiled program computes the eager model's forward"
    )
    expected = {"tags": torch.ones(2, 3), "length": 12}
    equal, differences = _output_differences({"tags": torch.ones(2, 3) * 1.5, "length": 12}, expected)
    assert not equal and differences == {"output['tags']": 0.5, "output['length']": 0.0}
    equal, differences = _output_differences({"tags": torch.ones(2, 3), "length": 11}, expected)
    assert not equal and differences["output['length']"] == float("inf")
    equal, differences = _output_differences({"tags": torch.ones(2, 3), "length": torch.tensor(12)}, expected)
    assert not equal and differences["output['length']"] == float("inf")


def test_an_inference_program_cannot_train(tmp_path):
    program = load_program(compile_to(tmp_path, f"{FIXTURE}:classifier", 2, schedule="forward-only"))
    pipeline = InProcessPipeline(program)
    with pytest.raises(ProgramError, match="compiled for inference"):
        pipeline.step(next(batches(program, pipeline.spec, 0)))


def test_a_model_without_a_loss_is_refused_for_training_and_pointed_to_inference(tmp_path):
    result = ppcompile("compile", f"{FIXTURE}:classifier", "-k", "2", "-o", tmp_path / "out")
    assert_user_error(result, "forward must return the scalar loss", "[8, 10]", "--schedule forward-only")
    assert not (tmp_path / "out").exists()
    result = ppcompile(
        "compile",
        f"{FIXTURE}:tiny_lm",
        "-k",
        "2",
        "--schedule",
        "forward-only",
        "--fuse-loss",
        "-o",
        tmp_path / "f",
    )
    assert_user_error(result, "--fuse-loss", "--schedule forward-only", "leave out one of the two")


def test_profile_measures_forward_only_for_inference(tmp_path):
    # Without autograd, neither the node times nor the stages timed whole have a backward.
    program_dir = compile_to(
        tmp_path,
        f"{FIXTURE}:classifier",
        2,
        microbatches=4,
        schedule="forward-only",
        profile=True,
        profile_cache=None,
        profile_concurrency=1,
    )
    program = json.loads((program_dir / "program.json").read_text())
    calibrated = program["costs"]["calibrated"]
    assert all(s["forward_seconds"] > 0 and not s["backward_seconds"] for s in calibrated["stages"])
    assert all(s["backward_seconds"] == 0 for s in program["costs"]["stages"])
    assert "F (inference) per micro-batch" in (program_dir / "report.md").read_text()


def test_joined_concatenates_along_each_leafs_batch_dim():
    parts = [{"x": torch.full((1, 2), float(m)), "n": 3} for m in range(3)]
    out = joined(parts, {"output['x']": 0, "output['n']": None})
    assert torch.equal(out["x"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])) and out["n"] == [3, 3, 3]


def test_torchrun_saves_the_outputs_of_every_batch(tmp_path):
    program_dir = compile_to(tmp_path, f"{FIXTURE}:tagger", 2, microbatches=2, schedule="forward-only")
    saved = tmp_path / "outputs.pt"
    result = subprocess.run(
        torchrun_command(program_dir, 2, "--steps", "2", "--outputs", str(saved)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval step 2/2 |" in result.stdout and f"wrote {saved}" in result.stdout
    outputs = torch.load(saved)
    program = load_program(program_dir)
    spec = ModelRef.parse(f"{FIXTURE}:tagger").build("cpu", seed=0)
    data = batches(program, spec, 0)
    for step in outputs:  # each batch's micro-batches joined along the batch dim
        microbatches = next(data)
        expected = joined(_eager_outputs(program, microbatches), program.output_batch_dims())
        assert step["tags"].shape == (8, 12, 7) and torch.equal(step["tags"], expected["tags"])
        assert step["length"] == [12, 12] and torch.equal(step["padding"], expected["padding"])


def test_run_py_refuses_outputs_for_a_training_program(tmp_path):
    program_dir = compile_to(tmp_path, "models/mlp.py:mlp", 1)
    result = subprocess.run(
        [sys.executable, str(program_dir / "run.py"), "--outputs", str(tmp_path / "o.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_user_error(result, "--outputs", "--schedule forward-only")


def test_a_budget_inference_cannot_fit_names_parameters_alone(tmp_path):
    args = ["-k", "2", "--schedule", "forward-only", "--memory-per-device", "30KiB", "-o", tmp_path / "out"]
    result = ppcompile("compile", f"{FIXTURE}:tiny_lm", *args)
    assert_user_error(
        result, "rank 0 needs", "no layer to recompute", "short (parameters ", "use more --stages"
    )
    assert "gradients" not in result.stderr


def test_verify_gives_the_eager_model_the_inputs_before_the_program_updated_them(tmp_path):
    """verify handed the eager forward the micro-batches the program's forward had already
    doubled in place, and reported a correct program as differing."""
    for stages in (2, 3):
        program = load_program(
            compile_to(tmp_path / str(stages), f"{FIXTURE}:rescales_input", stages, schedule="forward-only")
        )
        comparison = verify_inference_in_process(program, steps=2)
        assert comparison.ok and comparison.outputs_bitwise_equal, comparison.lines()


def test_a_named_tuple_inside_a_returned_dict_is_built_in_the_stage_file(tmp_path):
    """The stage file cannot import the model's module: it was refused as 'stage code cannot call
    ppc_model_<hash>.Spread'."""
    program_dir = compile_to(tmp_path, f"{FIXTURE}:summarizer", 2, schedule="forward-only")
    assert "collections.namedtuple('Spread', ('mean', 'std'))(" in (program_dir / "stage_1.py").read_text()
    comparison = verify_inference_in_process(load_program(program_dir), steps=2)
    assert comparison.ok and comparison.outputs_bitwise_equal, comparison.lines()
    assert comparison.worst_output.startswith("output['")
