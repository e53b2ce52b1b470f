"""Chaining the generated stage modules reproduces the eager loss bitwise, with the same weights."""

import pytest
import torch

from tests.helpers import build_model, chained_forward, compile_to

MODELS = [
    "models/gpt.py:gpt_mini",
    "models/mlp.py:mlp",
    "models/mlp.py:mlp_deep",
    "tests/fixtures/zoo.py:encoder",
]


@pytest.mark.parametrize("ref", MODELS)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stages_chain_to_eager_loss_bitwise(tmp_path, ref, stages):
    program_dir = compile_to(tmp_path, ref, stages)
    model, inputs = build_model(ref)
    with torch.no_grad():
        eager = model(*inputs)
        chained = chained_forward(program_dir, model, inputs)
    assert torch.equal(eager, chained), f"{ref} K={stages}: {eager.item()} != {chained.item()}"


def test_gpt_small_chains_bitwise(tmp_path):
    ref = "models/gpt.py:gpt_small"
    program_dir = compile_to(tmp_path, ref, 4)
    model, inputs = build_model(ref)
    idx, targets = (t[:, :128] for t in inputs)  # symbolic s: the program serves any length
    with torch.no_grad():
        assert torch.equal(model(idx, targets), chained_forward(program_dir, model, (idx, targets)))


def test_one_program_serves_other_microbatch_sizes(tmp_path):
    ref = "models/gpt.py:gpt_mini"
    program_dir = compile_to(tmp_path, ref, 3)
    model, _ = build_model(ref)
    idx = torch.randint(0, 128, (7, 19))
    targets = torch.randint(0, 128, (7, 19))
    with torch.no_grad():
        assert torch.equal(model(idx, targets), chained_forward(program_dir, model, (idx, targets)))


def test_stage_state_dicts_keep_model_names(tmp_path):
    ref = "models/gpt.py:gpt_mini"
    program_dir = compile_to(tmp_path, ref, 2)
    from ppcompile.runtime.loader import load_program

    program = load_program(program_dir)
    model, _ = build_model(ref)
    names = set()
    for s in range(2):
        keys = set(program.stage_class(s)(model).state_dict())
        assert keys <= set(model.state_dict(keep_vars=True)) | {"lm_head.weight"}
        names |= keys
    assert names == set(model.state_dict())
