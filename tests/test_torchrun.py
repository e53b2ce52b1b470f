"""The real path: torchrun processes on gloo. Few and small; breadth lives in test_runtime.py."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from ppcompile.runtime.loader import load_program
from tests.helpers import compare_record, compile_to, torchrun_command

AUTOCAST = "tests/fixtures/autocast_regions.py:model"


def torchrun(program_dir, nproc, *args):
    return torchrun_command(program_dir, nproc, *args)


def run(program_dir, nproc, *args, timeout=240):
    return subprocess.run(
        torchrun(program_dir, nproc, *args), capture_output=True, text=True, timeout=timeout
    )


def trained(tmp_path, program_dir, nproc):
    """Three SGD steps of the program under torchrun; the directory its ranks --record into."""
    record = tmp_path / "record"
    result = run(
        program_dir, nproc, "--steps", "3", "--optimizer", "sgd", "--lr", "0.05", "--record", str(record)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return record


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 4])
# The encoder's cuts cross several tensors at once (three inputs, a long skip): packed messages.
@pytest.mark.parametrize("ref", ["models/gpt.py:gpt_mini", "tests/fixtures/zoo.py:encoder"])
def test_torchrun_trains_like_eager(tmp_path, ref, stages, schedule):
    program_dir = compile_to(tmp_path, ref, stages, microbatches=4, schedule=schedule)
    record = trained(tmp_path, program_dir, stages)
    losses, reference, comparison = compare_record(program_dir, record, stages)
    assert comparison.ok, "\n".join(comparison.lines())
    assert losses[0] == reference[0][0]  # the first step's per-micro-batch losses, bitwise


@pytest.mark.parametrize(
    "ref, dtypes",
    [
        # The blocks run under bfloat16 autocast: each rank enters it around its share, and the
        # cuts carry bfloat16 tensors over gloo into buffers the program sized as bfloat16.
        (AUTOCAST, {"float32", "bfloat16"}),
        # A spectral filter's complex spectrum, and its gradient back (gloo sends it as real).
        ("tests/fixtures/complex_spectral.py:model", {"float32", "complex64"}),
        # The model's own autograd.Functions, found by each rank in the model's file.
        ("tests/fixtures/custom_functions.py:model", {"float32"}),
    ],
)
def test_torchrun_sends_activations_in_their_dtype(tmp_path, ref, dtypes):
    program_dir = compile_to(tmp_path, ref, 3, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    assert {b["dtype"] for b in program["boundaries"]} == dtypes
    record = trained(tmp_path, program_dir, 3)
    losses, reference, comparison = compare_record(program_dir, record, 3)
    assert comparison.ok, "\n".join(comparison.lines())
    assert losses[0] == reference[0][0]


def test_torchrun_updates_buffers_like_eager(tmp_path):
    # BatchNorm in every block and a skip over four of them: the ranks' running statistics, as
    # --record saves them, against the eager model's after the same three steps.
    program_dir = compile_to(tmp_path, "tests/fixtures/unseen_cnn_batchnorm.py:factory", 2, microbatches=4)
    record = trained(tmp_path, program_dir, 2)
    _, _, comparison = compare_record(program_dir, record, 2)
    assert comparison.ok, "\n".join(comparison.lines())
    assert "running_mean" in comparison.worst_buffer or "running_var" in comparison.worst_buffer


def test_torchrun_draws_dropout_and_data_as_in_process(tmp_path):
    # Dropout on, and a data function drawing from the global generator batch by batch: each
    # stage's stream and the data's are the same in separate processes as in one.
    from tests.test_runtime import DROPOUT_WITH_DATA, dropout_losses

    program_dir = compile_to(tmp_path, DROPOUT_WITH_DATA, 2, microbatches=4)
    record = trained(tmp_path, program_dir, 2)
    losses = next(r["losses"] for r in map(torch.load, sorted(record.glob("rank*.pt"))) if r["losses"])
    assert losses == dropout_losses(program_dir)


@pytest.fixture(scope="module")
def mini_program(tmp_path_factory):
    return compile_to(tmp_path_factory.mktemp("mini"), "models/gpt.py:gpt_mini", 2, microbatches=4)


def test_wrong_world_size_is_one_clear_error(mini_program):
    result = run(mini_program, 3, "--steps", "1")
    assert result.returncode != 0
    assert (
        "error: this program has 2 ranks but torchrun started 3; use torchrun --nproc-per-node 2"
        in result.stderr
    )


def test_edited_stage_file_is_refused(tmp_path):
    program_dir = compile_to(tmp_path, "models/mlp.py:mlp", 2, microbatches=4)
    with open(program_dir / "stage_1.py", "a") as f:
        f.write("# a local tweak\n")
    result = run(program_dir, 2, "--steps", "1")
    assert result.returncode != 0
    assert "stage_1.py was changed after compilation" in result.stderr


def test_killed_rank_ends_the_others_naming_the_peer(tmp_path):
    program_dir = compile_to(tmp_path, "models/gpt.py:gpt_mini", 2, microbatches=4)
    timeout = 20
    process = subprocess.Popen(
        torchrun(program_dir, 2, "--steps", "100000", "--timeout", str(timeout)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.startswith("step 3/"):
                break
        workers = subprocess.run(
            ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
        rank0 = next(p for p in workers if b"RANK=0\x00" in open(f"/proc/{p}/environ", "rb").read())
        start = time.monotonic()
        os.kill(int(rank0), signal.SIGKILL)  # rank 0 dies mid-step; rank 1 waits on its activations
        output = process.stdout.read()
        process.wait(timeout=timeout + 30)
        elapsed = time.monotonic() - start
    finally:
        process.kill()
    assert process.returncode != 0
    assert elapsed < timeout + 15
    # Either its receive fails on the closed connection, or torchrun stops it first: both name rank 0.
    assert "error: rank 1:" in output, output[-2000:]
    line = next(line for line in output.splitlines() if line.startswith("error: rank 1:"))
    assert "on rank 0" in line or line.endswith("with rank 0"), line


def test_torchrun_sends_a_buffer_forward_changes_as_it_was(tmp_path):
    # The first stage advances a step counter and sends it to the head; its sender thread reads
    # the message after the rank has gone on to the next micro-batch, which advances it again.
    program_dir = compile_to(tmp_path, "tests/fixtures/buffer_assign.py:warmed_up", 3, microbatches=4)
    record = trained(tmp_path, program_dir, 3)
    losses, reference, comparison = compare_record(program_dir, record, 3)
    assert comparison.ok, "\n".join(comparison.lines())
    assert losses[0] == reference[0][0]


def test_torchrun_keeps_a_sent_tensors_memory_layout(tmp_path):
    # The stream lies in memory channel by channel and attention's output as a transposed view:
    # each crosses gloo in its memory order and arrives laid out as eager has it, so the BatchNorms
    # after the cut sum as eager's do.
    program_dir = compile_to(
        tmp_path, "tests/fixtures/verify_batchnorm.py:channel_norm_stream", 2, microbatches=4
    )
    assert any("dim_order" in b for b in load_program(program_dir).data["boundaries"])
    record = trained(tmp_path, program_dir, 2)
    losses, reference, comparison = compare_record(program_dir, record, 2)
    assert comparison.ok, "\n".join(comparison.lines())
    assert losses[0] == reference[0][0] and comparison.max_gradient_difference == 0.0


def test_torchrun_leaves_a_frozen_tied_parameter_as_it_was_under_adamw(tmp_path):
    # Each rank once gave its copy a zero gradient for the all-reduce, and AdamW decayed it.
    from tests.fixtures.fine_tuning import tied_frozen_embedding

    program_dir = compile_to(
        tmp_path, "tests/fixtures/fine_tuning.py:tied_frozen_embedding", 2, microbatches=4
    )
    record = tmp_path / "record"
    result = run(
        program_dir, 2, "--steps", "2", "--optimizer", "adamw", "--lr", "0.01", "--record", str(record)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    initial = tied_frozen_embedding().module.embed.weight
    held = {n: p for r in range(2) for n, p in torch.load(record / f"rank{r}.pt")["params"].items()}
    assert torch.equal(held["embed.weight"], initial) and torch.equal(held["head.weight"], initial)
