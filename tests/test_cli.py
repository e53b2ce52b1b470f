"""Bad input: one clear line on stderr, exit code 2, nothing half-written."""

import pytest

from tests.helpers import assert_user_error, ppcompile


@pytest.mark.parametrize(
    "spec,stages,needles",
    [
        ("models/nope.py:gpt_mini", "2", ["models/nope.py", "does not exist"]),
        ("models/gpt.py:gpt_huge", "2", ["gpt_huge", "gpt_mini"]),
        ("models/gpt.py", "2", ["PATH.py:FACTORY"]),
        ("tests/fixtures/untraceable.py:model", "2", ["untraceable.py:14", "if h.sum() > 0", "cannot trace"]),
        (
            "tests/fixtures/untraceable.py:boolean_indexed",
            "2",
            ["untraceable.py:30: `kept = h[h > 0]", "cannot be computed from the input shapes"],
        ),
        (
            "tests/fixtures/untraceable.py:mixed_batch",
            "2",
            [
                "example input 'batch' is a dict holding a float",
                "dicts, lists, tuples or named tuples of tensors",
            ],
        ),
        (
            "tests/fixtures/keyword_inputs.py:unknown_name",
            "2",
            ["keyword_inputs.py:unknown_name: example input 'label' is not among forward's inputs", "labels"],
        ),
        (
            "tests/fixtures/untraceable.py:one_hot_without_width",
            "2",
            ["untraceable.py:269", "F.one_hot without num_classes", "give num_classes"],
        ),
        (
            "tests/fixtures/untraceable.py:hooked_model",
            "2",
            [
                "a forward hook (_scale_loss) is registered on the model itself",
                "register the hook on a submodule",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:large_constant",
            "2",
            [
                "untraceable.py:",
                "torch.eye(16)",
                "constant tensor of shape [16, 16]",
                "register it as a buffer",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:data_assigned",
            "2",
            [
                "`h.data = h.data.clamp(-1.0, 1.0)`: forward sets `.data` of a computed tensor (net)",
                "torch.no_grad(): tensor.copy_(new_value)",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:gradient_hook",
            "2",
            ["h.register_hook(lambda g: g * 0.5)", "gradient hook", "register hooks outside forward"],
        ),
        (
            "tests/fixtures/weights_written.py:renormalised_prototypes",
            "2",
            ["changes the trained parameter `prototypes.weight` in place", "after optimizer.step()"],
        ),
        (
            "tests/fixtures/weights_written.py:tied_max_norm",
            "2",
            [
                "`embed.weight` belongs to an nn.Embedding with max_norm=1.0",
                "`head` reads it too (a tied head)",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:value_in_function",
            "2",
            [
                "`FakeQuantise.forward` reads a tensor's value as an int or float (.item())",
                "keep it a tensor",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:layer_drop",
            "2",
            [
                "untraceable.py:",
                "`if not self.training or dropout_probability > self.layerdrop:`",
                "forward draws with random.uniform, which runs once, as the model is traced",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:sparse_adjacency",
            "2",
            ["computes on a sparse tensor, which has no meta kernel here", "pass messages densely"],
        ),
        (
            "tests/fixtures/untraceable.py:full_covariance_prior",
            "2",
            ["`prior = torch.distributions.MultivariateNormal(", "torch code here takes sizes as plain ints"],
        ),
        (
            "tests/fixtures/untraceable.py:bags_with_offsets",
            "2",
            ["symbol 'b' is 40 in 'text' and 8 in 'offsets'", "pad the bags to a (B, L) input"],
        ),
        (
            "tests/fixtures/untraceable.py:layer_built_in_forward",
            "2",
            [
                "`return self.out(projection(x)).mean()`",
                "forward calls a Linear that is not a submodule of the model",
                "make it a submodule in __init__",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:lazy_layers",
            "2",
            ["lazy_layers: layer 0, 2 is not initialised", "call the model once on the example inputs"],
        ),
        (
            "tests/fixtures/untraceable.py:edge_list",
            "2",
            ["symbol 'b' is 20 in 'x' and 2 in 'edge_index'", "ModelSpec(dims={'edge_index': {}})"],
        ),
        (
            "tests/fixtures/untraceable.py:logged_loss",
            "2",
            ["`self.last_loss = loss.item()`", "reads a tensor's value (item())", "return loss, {"],
        ),
        (
            "tests/fixtures/untraceable.py:python_counter",
            "2",
            ["`self.calls += 1`", "changes `self.calls` from 0 to 1", "register_buffer('calls'"],
        ),
        (
            "tests/fixtures/untraceable.py:gradient_penalty",
            "2",
            ["torch.autograd.grad(out, x, create_graph=True)", "a backward inside forward"],
        ),
        (
            "tests/fixtures/untraceable.py:cumulative_batchnorm",
            "2",
            ["`1` (BatchNorm1d) reads a tensor's value as it runs", "give it a momentum"],
        ),
        (
            "tests/fixtures/untraceable.py:reentrant_on_input",
            "2",
            ["use_reentrant=True on x, none of which needs a gradient", "pass use_reentrant=False"],
        ),
        (
            "tests/fixtures/sequence_first.py:model",
            "2",
            [
                "`layers.0` (TransformerEncoderLayer, batch_first=False) reads its input sequence first",
                "dims={'src': {0: 's', 1: 'b'}, 'targets': {0: 's', 1: 'b'}}",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:queue_pointer",
            "2",
            [
                "`ptr = int(self.queue_ptr)`: forward reads a tensor's value (int())",
                "keep the index a tensor",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:row_at_step",
            "2",
            [
                "`return (self.fc(x) + self.table[self.step]).square().mean()`",
                "indexing by a 0-d integer tensor reads its value as an int",
                "table[idx.view(1)].squeeze(0)",
            ],
        ),
        (
            "tests/fixtures/untraceable.py:late_bound_checkpoint",
            "2",
            ["checkpoints a lambda that reads `block` from around it", "(lambda t, block=block: ...)"],
        ),
        ("models/mlp.py:mlp", "500 --schedule gpipe", ["--stages 500", "places it can be cut"]),
        ("models/mlp.py:mlp", "0", ["--stages must be at least 1"]),
        (
            "tests/fixtures/returns_more.py:returns_dict_without_loss",
            "2",
            ["returns_dict_without_loss", "keys 'logits', 'ce' and no 'loss'", "put it under 'loss'"],
        ),
        (
            "tests/fixtures/returns_more.py:returns_logits_only",
            "2",
            ["forward must return the scalar loss", "a tensor of shape [8, 5]", ".mean()"],
        ),
        (
            "tests/fixtures/returns_more.py:returns_logits_before_two_scalars",
            "2",
            ["a tuple of 3 whose first element is a tensor of shape [8, 5]", "elements 1, 2 are scalars"],
        ),
        (
            "tests/fixtures/shape_control_flow.py:stepped_per_token",
            "2",
            [
                "runs only at its example's s=5: tried s = 4, 10; at s=4, ",
                "shape_control_flow.py:102: `h = self.norm(self.cell(x[:, t], h))`: IndexError",
                "`for t in range(x.size(1)):` -> 5, which holds at that size only: leave s out of ModelSpec.dims",
            ],
        ),
        (
            "tests/fixtures/shape_control_flow.py:model",
            "2 --dims s=3",
            ["shape_control_flow.py:43", "is True for the example's b=4, s=6 but False for --dims s=3"],
        ),
        (
            "tests/fixtures/shape_control_flow.py:model",
            "2 --dims s=16",
            ["--dims s=16: the model fails at that shape", "shape_control_flow.py:39", "AssertionError"],
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, spec, stages, needles):
    out = tmp_path / "out"
    result = ppcompile("compile", spec, "--stages", *stages.split(), "-o", str(out))
    assert_user_error(result, *needles)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_refuses_to_overwrite_a_directory_that_is_not_a_program(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = ppcompile("compile", "models/mlp.py:mlp", "--stages", "2", "-o", str(out))
    assert_user_error(result, "not a ppcompile program")
    assert (out / "notes.txt").read_text() == "keep me"


def test_recompiles_over_a_previous_program_and_reports(tmp_path):
    out = tmp_path / "prog"
    for stages in ("2", "3"):
        result = ppcompile("compile", "models/mlp.py:mlp", "--stages", stages, "-o", str(out))
        assert result.returncode == 0, result.stderr
    report = ppcompile("report", str(out))
    assert report.returncode == 0
    assert "imbalance (slowest / mean stage time)" in report.stdout
    stage_table = report.stdout.split("Predicted peak memory")[0]
    assert stage_table.count("\n|") == 3 + 2  # header, rule, three stages
    assert "Predicted peak memory per rank" in report.stdout


def test_unknown_schedule_and_too_few_microbatches(tmp_path):
    result = ppcompile(
        "compile", "models/mlp.py:mlp", "--stages", "2", "--schedule", "zigzag", "-o", str(tmp_path / "x")
    )
    assert_user_error(result, "zigzag", "1f1b", "gpipe")
    result = ppcompile("compile", "models/mlp.py:mlp", "--stages", "4", "-m", "2", "-o", str(tmp_path / "x"))
    assert_user_error(result, "2", "4")


def test_report_of_a_non_program(tmp_path):
    assert_user_error(ppcompile("report", str(tmp_path)), "not a ppcompile program")


@pytest.mark.parametrize("given", ["none", "NONE", ""])
def test_profile_cache_none_or_empty_keeps_nothing(tmp_path, monkeypatch, given):
    # An empty path used to mean this directory: profiles landed wherever the user stood.
    from click.testing import CliRunner

    from ppcompile import cli, driver
    from ppcompile.errors import CompileError

    seen = []

    def recorded(spec, config):
        seen.append(config.profile_cache)
        raise CompileError("stop here")

    monkeypatch.setattr(driver, "compile_model", recorded)
    monkeypatch.chdir(tmp_path)
    args = ["compile", "models/mlp.py:mlp", "-k", "2", "--profile", "--profile-cache", given, "-o", "out"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and seen == [None]
    assert list(tmp_path.iterdir()) == []


def test_compile_warns_where_forward_relates_the_samples_of_a_micro_batch(tmp_path):
    # SimCLR's [b, b] similarities: per micro-batch, each sample meets fewer negatives than in the
    # whole batch, which the program trains on as gradient accumulation would, and says.
    out = tmp_path / "simclr"
    ref = "tests/fixtures/in_batch_contrastive.py:simclr"
    result = ppcompile("compile", ref, "--stages", "2", "--microbatches", "4", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        "warning: forward relates the samples of a micro-batch to each other: tests/fixtures/in_batch_contrastive.py:"
    )
    assert (
        "`similarity = z @ z.t() / self.temperature  # [b, b]` is [b, b], so each sample meets"
        in result.stderr
    )
    assert "forward relates the samples" in (out / "report.md").read_text()
    single = ppcompile("compile", ref, "--stages", "1", "--microbatches", "1", "-o", tmp_path / "one")
    assert single.returncode == 0 and "warning" not in single.stderr


def test_dims_the_model_does_not_run_at_are_one_line(tmp_path):
    # The costs were taken from the shape formulas at s=40, where the 16-row table cannot be sliced.
    ref = "tests/fixtures/capped_positions.py:model"
    assert_user_error(
        ppcompile("compile", ref, "--stages", "2", "--dims", "b=4,s=40", "-o", tmp_path / "long"),
        "--dims b=4,s=40: the model fails at that shape: tests/fixtures/capped_positions.py:",
        "`h = self.embed(ids) + self.positions[: ids.size(1)]`",
    )
    within = ppcompile("compile", ref, "--stages", "2", "--dims", "b=4,s=16", "-o", tmp_path / "short")
    assert within.returncode == 0, within.stderr
