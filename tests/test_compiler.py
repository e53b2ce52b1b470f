"""Compiler outputs: golden code, determinism, symbolic ports, balance, direct skip sends, tied groups."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from ppcompile import devices
from ppcompile.errors import CompileError
from tests.helpers import compile_to

GOLDEN = Path(__file__).parent / "golden" / "gpt_mini_k2"
GOLDEN_FILES = ["stage_0.py", "stage_1.py", "schedule.txt"]


def test_golden_generated_code(tmp_path, update_golden):
    program_dir = compile_to(tmp_path, "models/gpt.py:gpt_mini", 2)
    if update_golden:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in GOLDEN_FILES:
            shutil.copy(program_dir / name, GOLDEN / name)
    for name in GOLDEN_FILES:
        expected = (GOLDEN / name).read_text()
        assert (program_dir / name).read_text() == expected, (
            f"{name} differs from tests/golden; if intended, run pytest --update-golden and review the diff"
        )


def test_recompiling_gives_byte_identical_files(tmp_path):
    a = compile_to(tmp_path / "a", "models/mlp.py:mlp", 3)
    b = compile_to(tmp_path / "b", "models/mlp.py:mlp", 3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_boundary_shapes_are_symbolic(tmp_path):
    program = json.loads((compile_to(tmp_path, "models/gpt.py:gpt_mini", 2) / "program.json").read_text())
    assert [b["shape"] for b in program["boundaries"]] == [["b", "s", "64"]]
    assert {i["name"]: i["shape"] for i in program["inputs"]} == {"idx": ["b", "s"], "targets": ["b", "s"]}


def test_skip_tensors_go_straight_to_each_consumer(tmp_path):
    program = json.loads((compile_to(tmp_path, "models/mlp.py:mlp_deep", 4) / "program.json").read_text())
    far = [b for b in program["boundaries"] if max(b["consumers"]) - b["producer"] >= 2]
    assert far, "mlp_deep's 8-layer skips must cross more than one stage"
    for b in far:
        stage = program["stages"][max(b["consumers"])]
        assert b["name"] in stage["receives"]  # received from the producer itself, not a relay
        for middle in range(b["producer"] + 1, max(b["consumers"])):
            if middle not in b["consumers"]:
                assert b["name"] not in program["stages"][middle]["receives"]


def test_tied_embedding_is_a_tied_group(tmp_path):
    program = json.loads((compile_to(tmp_path, "models/gpt.py:gpt_mini", 3) / "program.json").read_text())
    assert program["tied_parameters"] == [
        {"parameters": ["lm_head.weight", "transformer.wte.weight"], "stages": [0, 2]}
    ]


def _imbalance(program):
    times = [s["seconds"] for s in program["costs"]["stages"]]
    return max(times) / (sum(times) / len(times))


@pytest.mark.parametrize("stages", [3, 4])
def test_gpt_small_balance(tmp_path, stages):
    program_dir = compile_to(tmp_path, "models/gpt.py:gpt_small", stages, microbatches=16)
    program = json.loads((program_dir / "program.json").read_text())
    report = (program_dir / "report.md").read_text()
    assert "even split by layer count" in report
    even = program["costs"]["even_split_seconds"]
    assert _imbalance(program) < max(even) / (sum(even) / stages)
    if stages == 3:
        assert _imbalance(program) <= 1.05
    else:
        # The LM head alone is over a quarter of the model: the report must say so.
        assert "heaviest node `lm_head`" in report


def test_link_latency_does_not_starve_middle_stages(tmp_path, monkeypatch):
    # Latency delays a message but keeps no rank busy; middle stages send and receive on both
    # sides, so charging it as stage time would shrink them to nothing.
    slow_link = replace(devices.PROFILES["cpu"], link_latency=1.0)
    monkeypatch.setitem(devices.PROFILES, "cpu", slow_link)
    program_dir = compile_to(tmp_path, "models/gpt.py:gpt_mini", 4)
    program = json.loads((program_dir / "program.json").read_text())
    compute = [s["compute_seconds"] for s in program["costs"]["stages"]]
    assert max(compute) / (sum(compute) / 4) <= 1.10, compute
    assert program["costs"]["link"]["latency_seconds"] == 1.0
    # The simulator still charges it, as the delay it is.
    assert program["costs"]["simulated_step_seconds"] > 2 * 3 * 1.0


def test_verifier_runs_after_every_pass(tmp_path):
    # compile_to sets check=True; a stage count that forces cuts inside blocks must still verify.
    compile_to(tmp_path, "models/gpt.py:gpt_mini", 4, microbatches=4)


def test_control_flow_on_shapes_is_decided_for_the_example(tmp_path):
    # nanoGPT's `assert t <= block_size`, `if x.dim() == 3` in every block, a branch on t: fx
    # alone refuses them all. Sampling other sizes for the cost formulas must stay under the
    # block size too (growing s from 6 to 12 overflows the causal mask of 8).
    from ppcompile.check_training import verify_in_process
    from ppcompile.runtime.loader import load_program

    program_dir = compile_to(tmp_path, "tests/fixtures/shape_control_flow.py:model", 2, microbatches=4)
    notes = json.loads((program_dir / "program.json").read_text())["costs"]["notes"]
    (decided,) = [n for n in notes if n.startswith("control flow on shapes")]
    assert decided.startswith("control flow on shapes, decided for the example's (b=4, s=6): ")
    assert "shape_control_flow.py:39: `assert t <= self.block_size" in decided
    assert "shape_control_flow.py:24: `if x.dim() == 3:  # batched` -> True (4 times)" in decided
    assert "shape_control_flow.py:43: `scale = 2.0 if t > 4 else 3.0` -> True" in decided
    code = "".join(p.read_text() for p in program_dir.glob("stage_*.py"))
    assert ".dim()" not in code and " <= " not in code and " > 4" not in code  # nothing left of them
    result = verify_in_process(load_program(program_dir), steps=2)
    assert result.ok, "\n".join(result.lines())


def test_a_batch_whose_sizes_decide_a_condition_otherwise_is_refused(tmp_path):
    """The stages hold what forward decided for the example's sizes; a batch that would decide it
    otherwise trained silently on the example's branch. program.json keeps each decision's
    condition in the dims, and every batch is checked against it."""
    from ppcompile.check_training import verify_in_process
    from ppcompile.runtime.loader import load_program
    from tests.helpers import assert_user_error, ppcompile

    program_dir = compile_to(tmp_path, "tests/fixtures/shape_control_flow.py:lengths_vary", 2, microbatches=2)
    decided = json.loads((program_dir / "program.json").read_text())["decided"]
    # `if x.dim() == 3` holds at every size: nothing to check.
    assert [(d["formula"], d["value"]) for d in decided] == [("(s <= 8)", True), ("(s > 4)", True)]
    result = verify_in_process(load_program(program_dir), steps=2)  # s = 6, then 5: as traced
    assert result.ok, "\n".join(result.lines())
    assert_user_error(
        ppcompile("verify", program_dir, "--steps", 3),
        "error: a micro-batch of b=4, s=3 would not run as the model's forward does: "
        "tests/fixtures/shape_control_flow.py:43: `scale = 2.0 if t > 4 else 3.0` decides False here but True "
        "where the program was traced; the stages hold what forward decided at the sizes traced (b=4, s=6): "
        "give batches of those sizes, or compile from an example of these",
    )


def test_loops_over_a_dim_unroll_and_the_batch_stays_symbolic(tmp_path):
    from ppcompile.check_training import verify_in_process
    from ppcompile.runtime.loader import load_program

    program_dir = compile_to(tmp_path, "tests/fixtures/shape_control_flow.py:stepped", 2, microbatches=4)
    program = json.loads((program_dir / "program.json").read_text())
    (decided,) = [n for n in program["costs"]["notes"] if n.startswith("control flow on shapes")]
    assert "`for t in range(x.size(1)):` -> 5" in decided
    assert "`if t == int(x.size(1) / 2):` -> 2 (5 times)" in decided  # int(): the comparison is Python's
    # len(x) and torch.zeros(x.size(0), d) are nodes of the graph: the batch dim stays b.
    assert all(b["shape"][0] == "b" for b in program["boundaries"]), program["boundaries"]
    result = verify_in_process(load_program(program_dir), steps=2)
    assert result.ok, "\n".join(result.lines())


def test_iterating_a_traced_value_unrolls_for_the_example(tmp_path):
    # for chunk in h.split(2, dim=1): three chunks of six, a decision; *h.shape[:-1] and
    # for size in h.shape: the rank, which no size changes, so not one.
    from ppcompile.check_training import verify_in_process
    from ppcompile.runtime.loader import load_program

    program_dir = compile_to(tmp_path, "tests/fixtures/shape_control_flow.py:chunked", 2, microbatches=4)
    notes = json.loads((program_dir / "program.json").read_text())["costs"]["notes"]
    (decided,) = [n for n in notes if n.startswith("control flow on shapes")]
    assert decided.endswith("`for chunk in h.split(2, dim=1):  # (B, 2, d) each` -> 3"), decided
    result = verify_in_process(load_program(program_dir), steps=2)
    assert result.ok, "\n".join(result.lines())
    assert result.first_step_losses_equal
    # With the length a symbolic dim, costing at other lengths fails; the error names the loop.
    with pytest.raises(
        CompileError, match=r"costing the model at other .*`for chunk in h.split\(2, dim=1\):.*-> 3"
    ):
        compile_to(tmp_path, "tests/fixtures/shape_control_flow.py:chunked_over_s", 2, microbatches=4)


def test_hugging_face_style_bert_trains_like_eager(tmp_path):
    from ppcompile.check_training import verify_in_process
    from ppcompile.runtime.loader import load_program

    program_dir = compile_to(tmp_path, "tests/fixtures/hf_bert.py:factory", 2, microbatches=4)
    code = (program_dir / "stage_0.py").read_text()
    assert "-3.4028234663852886e+38" in code  # torch.finfo(float32).min, a constant of the stage
    result = verify_in_process(load_program(program_dir), steps=2)
    assert result.ok, "\n".join(result.lines())
