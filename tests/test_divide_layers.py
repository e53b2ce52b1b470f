"""Cuts inside a linear layer: each side computes a band of its output features, where whole
nodes cannot even the stages (passes/divide_layers.py, passes/join_layers.py)."""

import torch

from ppcompile.check_training import verify_in_process
from ppcompile.context import CompileConfig
from ppcompile.driver import compile_model
from ppcompile.passes.divide_layers import column_bounds
from ppcompile.runtime.layers import linear_columns
from ppcompile.runtime.loader import load_program
from tests.helpers import build_model, chained_forward, compile_to

WIDE = "tests/fixtures/wide_head.py:wide_head"
TIED = "tests/fixtures/wide_head.py:tied_head"


def _imbalance(result) -> float:
    seconds = [s["seconds"] for s in result.program["costs"]["stages"]]
    return max(seconds) * len(seconds) / sum(seconds)


def test_a_head_heavier_than_a_stage_is_divided_and_evens_the_stages():
    whole = compile_model(WIDE, CompileConfig(stages=3, divide_layers=False))
    divided = compile_model(WIDE, CompileConfig(stages=3))
    assert whole.program["divided_layers"] == []
    assert "linear_columns" not in "".join(whole.files.values())
    # Whole nodes leave the head's stage a quarter over the mean; its bands come within 5%.
    assert _imbalance(whole) > 1.2
    assert _imbalance(divided) < 1.05
    # A block's layer may be divided too, where the first cut falls inside it.
    (head,) = [d for d in divided.program["divided_layers"] if d["layer"] == "head"]
    (first_stage, start, middle), (second_stage, middle_again, stop) = head["columns"]
    assert (first_stage, second_stage) == (1, 2)
    assert start == 0 and middle == middle_again and stop == 4096 and middle % 8 == 0
    # Each band is one call on its stage, joined by the stage after the cut.
    band = f"head_cols_0_{middle} = ppcompile.runtime.layers.linear_columns(norm, head_weight, None, 0, {middle})"
    assert band in divided.files["stage_1.py"]
    join = f"head = torch.cat([head_cols_0_{middle}, head_cols_{middle}_4096], -1)  # [b, s, 4096] float32"
    assert join in divided.files["stage_2.py"]
    groups = {tuple(g["parameters"]): g["stages"] for g in divided.program["tied_parameters"]}
    assert groups[("head.weight",)] == [1, 2]


def test_a_divided_head_trains_as_eager(tmp_path):
    program = load_program(compile_to(tmp_path, WIDE, 3))
    assert program.data["divided_layers"]
    result = verify_in_process(program, steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())
    # The bands' products are the whole product's: the first step's losses are bitwise eager's.
    assert result.first_step_losses_equal


def test_a_head_tied_to_the_embedding_is_divided_across_three_ranks_and_trains_as_eager(tmp_path):
    program = load_program(compile_to(tmp_path, TIED, 3))
    # The head is the F.linear of the embedding's weight; a block's layer may be divided too.
    (divided,) = [d for d in program.data["divided_layers"] if d["layer"] == "linear"]
    stages = [stage for stage, _, _ in divided["columns"]]
    assert stages == [1, 2]
    groups = {tuple(g["parameters"]): g["stages"] for g in program.data["tied_parameters"]}
    assert groups[("embed.weight",)] == sorted({0, *stages})
    result = verify_in_process(program, steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())


def test_divided_bands_run_at_another_micro_batch_shape(tmp_path):
    program_dir = compile_to(tmp_path, WIDE, 3)
    model, _ = build_model(WIDE)
    idx, targets = torch.randint(0, 4096, (3, 11)), torch.randint(0, 4096, (3, 11))
    with torch.no_grad():
        assert torch.equal(chained_forward(program_dir, model, (idx, targets)), model(idx, targets))


def test_layers_no_cut_divides_compile_to_the_code_whole_layers_give():
    # Bands are offered near each stage boundary, but gpt_mini's CPU link makes every band's
    # transfer dearer than the balance it buys: each layer is restored to its one call.
    divided = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=4))
    whole = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=4, divide_layers=False))
    assert divided.program["divided_layers"] == []
    stage_code = {k: v for k, v in divided.files.items() if k.endswith(".py")}
    assert stage_code == {k: v for k, v in whole.files.items() if k.endswith(".py")}


def test_bands_are_aligned_and_sum_to_the_layer():
    assert column_bounds(4096, 16) == list(range(0, 4097, 256))
    # Bands start on 16-column vectors and none is narrower: 100 columns hold at most 6.
    assert column_bounds(100, 16) == [0, 16, 32, 48, 64, 80, 100]
    assert column_bounds(20, 2) == [0, 20] and column_bounds(3, 16) == [0, 3]
    # Bands as column_bounds cuts them, of a layer wide enough to be divided: on x86 CPUs with
    # AVX-512, a product as small as 5x8 by 8x12 takes another kernel than its 5-column band, one
    # float32 rounding apart.
    x, w, b = torch.randn(5, 32), torch.randn(48, 32), torch.randn(48)
    bands = [linear_columns(x, w, b, lo, hi) for lo, hi in [(0, 16), (16, 48)]]
    assert torch.equal(torch.cat(bands, -1), torch.nn.functional.linear(x, w, b))


def test_frozen_and_in_place_layers_divide_and_train_as_eager(tmp_path):
    """A frozen layer's bands carry no gradient; a band's output scaled or added to in place is the
    joined layer's; the 0-d input has no batch dim, so every micro-batch gets it whole."""
    for K in (3, 4):
        program = load_program(compile_to(tmp_path / str(K), "tests/fixtures/divided_edges.py:model", K))
        assert "frozen" in [d["layer"] for d in program.data["divided_layers"]], K
        assert [i["shape"] for i in program.data["inputs"]][1] == []
        result = verify_in_process(program, steps=2, lr=0.05)
        assert result.ok, "\n".join(result.lines())
        assert result.first_step_losses_equal


def test_a_layer_with_hooks_is_never_divided(tmp_path):
    """Bands compute F.linear on slices of the weight, past the module's hooks: the frozen layer
    divided above keeps its hooks only whole."""
    program = load_program(compile_to(tmp_path, "tests/fixtures/divided_edges.py:hooked", 3))
    assert "frozen" not in [d["layer"] for d in program.data["divided_layers"]]
    result = verify_in_process(program, steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal


def test_a_divided_layer_before_batchnorm_meets_the_bar(tmp_path):
    """Bands sum their input's gradient band by band, not in the whole layer's order: on a bias
    BatchNorm cancels (zero in exact arithmetic) that leaves rounding noise of about one float32
    epsilon of the model's gradient scale, which the bar allows."""
    program = load_program(compile_to(tmp_path, "tests/fixtures/unseen_norm_blocks.py:mixed_wide", 4))
    assert [d["layer"] for d in program.data["divided_layers"]] == ["blocks_3_fc"]
    result = verify_in_process(program, steps=2)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal and 0 < result.max_gradient_difference
