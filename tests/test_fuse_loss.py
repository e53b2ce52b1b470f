"""--fuse-loss: the LM head and its cross-entropy as one blockwise call, held to eager's numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ppcompile.runtime.losses as losses
from ppcompile.check_training import verify_in_process
from ppcompile.context import CompileConfig
from ppcompile.driver import compile_model
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.train import InProcessPipeline, batches, build_spec
from tests.helpers import compile_to


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("block_rows", [7, 1000])
def test_linear_cross_entropy_matches_eager(monkeypatch, bias, ignored, block_rows):
    vocabulary = 37
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", block_rows * vocabulary)  # 7 rows: 9 blocks, one short
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 16, generator=generator, requires_grad=True)
    weight = torch.randn(vocabulary, 16, generator=generator, requires_grad=True)
    b = torch.randn(vocabulary, generator=generator, requires_grad=True) if bias else None
    target = torch.randint(0, vocabulary, (3, 20), generator=generator)
    if ignored:
        target[0, :5] = -100
    inputs = [t for t in (x, weight, b) if t is not None]

    expected = F.cross_entropy(F.linear(x, weight, b).view(-1, vocabulary), target.view(-1))
    expected_grads = torch.autograd.grad(expected * 0.25, inputs)  # 0.25: the runtime's 1 / M
    fused = losses.linear_cross_entropy(x, weight, b, target)
    grads = torch.autograd.grad(fused * 0.25, inputs)

    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(
            losses.linear_cross_entropy(x, weight, b, target), expected, rtol=1e-6, atol=0
        )


def test_a_float64_head_is_summed_in_float64():
    # The blocks were summed in float32 whatever the model's dtype: 4e-7 off a float64 model's loss.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 37, (40,), generator=generator)
    expected = F.cross_entropy(x @ weight.T, target)
    fused = losses.linear_cross_entropy(x, weight, None, target)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, expected, rtol=1e-13, atol=0)
    for got, want in zip(torch.autograd.grad(fused, (x, weight)), torch.autograd.grad(expected, (x, weight))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(
            losses.linear_cross_entropy(x, weight, None, target), expected, rtol=1e-13, atol=0
        )


def test_every_target_ignored_gives_nan_as_eager_does():
    x, weight = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8)
    target = torch.full((4,), -100)
    assert torch.isnan(F.cross_entropy(x @ weight.T, target))
    assert torch.isnan(losses.linear_cross_entropy(x, weight, None, target))


def test_mismatched_rows_and_targets_is_one_clear_error():
    with pytest.raises(ValueError, match="6 rows of x but 5 targets"):
        losses.linear_cross_entropy(
            torch.randn(6, 4), torch.randn(3, 4), None, torch.zeros(5, dtype=torch.long)
        )


@pytest.mark.parametrize(
    "ref, schedule, fused_with",
    [
        ("models/gpt.py:gpt_mini", "1f1b", "lm_head"),  # nn.Linear tied to the embedding, view(-1, V)
        ("models/gpt.py:gpt_mini", "zb-h1", "lm_head"),  # split backward through the fused call
        ("tests/fixtures/zoo.py:llama", "1f1b", "head"),  # flatten(0, 1)
        ("tests/fixtures/losses.py:tied_bias_lm", "gpipe", "emb.weight"),  # F.linear + bias, ignore_index=0
        ("tests/fixtures/losses.py:module_loss_lm", "1f1b", "head"),  # nn.CrossEntropyLoss, a biased head
    ],
)
def test_fused_programs_train_like_eager(tmp_path, ref, schedule, fused_with):
    program_dir = compile_to(tmp_path, ref, 2, microbatches=4, schedule=schedule, fuse_loss=True)
    program = load_program(program_dir)
    assert program.data["fused_losses"] == [fused_with]
    last = (program_dir / "stage_1.py").read_text()
    assert "ppcompile.runtime.losses.linear_cross_entropy(" in last
    assert "cross_entropy(" not in last.replace("linear_cross_entropy(", "")
    comparison = verify_in_process(program, steps=3, optimizer="sgd", lr=0.05)
    assert comparison.ok, "\n".join(comparison.lines())
    assert not comparison.bitwise_losses_expected
    # Forward-only evaluation takes the loss-only path (no gradients under no_grad).
    pipeline = InProcessPipeline(program)
    microbatches = next(batches(program, pipeline.spec, 0))
    model = build_spec(program, 0).module
    names = [i["name"] for i in program.data["inputs"]]
    with torch.no_grad():
        expected = [float(model(*(mb[n] for n in names))) for mb in microbatches]
    assert pipeline.evaluate(microbatches) == pytest.approx(expected, rel=1e-6)


def test_fusion_saves_the_logits_and_is_off_by_default():
    # One stage: the comparison is of what the loss saves, not of where two partitions cut.
    plain = compile_model("tests/fixtures/zoo.py:llama", CompileConfig(stages=1))
    fused = compile_model("tests/fixtures/zoo.py:llama", CompileConfig(stages=1, fuse_loss=True))
    assert plain.program["fused_losses"] == []
    assert "linear_cross_entropy" not in plain.files["stage_0.py"]
    # The stage keeps the head's gradients (64 x 32 weight, 64 rows x 32) instead of the
    # log-softmax of 64 rows x 64 classes and the head's input: 8 KiB less.
    (saved,) = [m["activations_per_microbatch"] for m in plain.program["costs"]["memory"]]
    (fused_saved,) = [m["activations_per_microbatch"] for m in fused.program["costs"]["memory"]]
    assert saved - fused_saved >= 8 * 1024
    assert any("loss fused with `head`" in note for note in fused.program["costs"]["notes"])


def test_other_losses_and_wide_heads_are_left_alone():
    smoothed = compile_model("tests/fixtures/losses.py:smoothed_lm", CompileConfig(stages=2, fuse_loss=True))
    assert smoothed.program["fused_losses"] == []
    assert any(
        note.startswith("--fuse-loss fused nothing: `cross_entropy` is called with label_smoothing=0.1;")
        for note in smoothed.program["costs"]["notes"]
    )
    # A classifier over 4 pooled rows of 32 features: its gradients would outweigh the logits.
    encoder = compile_model("tests/fixtures/zoo.py:encoder", CompileConfig(stages=2, fuse_loss=True))
    assert encoder.program["fused_losses"] == []
    assert any(
        "loss not fused with `head`: a micro-batch has 4 rows of logits" in note
        for note in encoder.program["costs"]["notes"]
    )


def test_cli_flag_fuses(tmp_path):
    out = tmp_path / "fused"
    run = subprocess.run(
        [sys.executable, "-m", "ppcompile", "compile", "models/gpt.py:gpt_mini", "--stages", "2"]
        + ["--fuse-loss", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "program.json").read_text())["fused_losses"] == ["lm_head"]
    assert "loss fused with `lm_head` (--fuse-loss)" in (out / "report.md").read_text()


def test_cli_warns_where_fuse_loss_fuses_nothing(tmp_path):
    # Hugging Face's shifted logits: the loss reads a slice of the head's output, which the fused
    # call does not compute; the program is written unfused, and the user is told why.
    assert (
        "warning: --fuse-loss fused nothing: `criterion` takes `contiguous` (made by .contiguous()) flattened, "
        "not a linear layer's output; it fuses F.cross_entropy"
    ) in _fused_compile_stderr(tmp_path, "tests/fixtures/losses.py:shifted_lm")
    assert "fused nothing" not in _fused_compile_stderr(tmp_path, "tests/fixtures/losses.py:module_loss_lm")


def _fused_compile_stderr(tmp_path, ref: str) -> str:
    out = tmp_path / ref.rsplit(":", 1)[1]
    run = subprocess.run(
        [sys.executable, "-m", "ppcompile", "compile", ref, "--stages", "2", "--fuse-loss", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return run.stderr
