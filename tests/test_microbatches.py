"""Splitting a global batch into micro-batches: --global-batch, --microbatches auto, and programs
that run at the micro-batch size they were compiled for (--dims)."""

import pytest
import torch

from ppcompile import driver
from ppcompile.check_training import verify_in_process
from ppcompile.context import CompileConfig
from ppcompile.driver import compile_model
from ppcompile.program import write_program
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.train import batches, build_spec, resized
from tests.helpers import assert_user_error, ppcompile


def _written(tmp_path, ref, **options):
    result = compile_model(ref, CompileConfig(**options))
    return result, load_program(write_program(tmp_path / "prog", result.program, result.files))


def test_resized_repeats_the_example_rows():
    t = torch.arange(6).reshape(3, 2)
    assert resized(t, (7, 2))[:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0]
    assert resized(t, (2, 1)).tolist() == [[0], [2]]
    assert resized(t, (3, 2)) is t


def test_a_global_batch_runs_in_micro_batches_of_its_share(tmp_path):
    """gpt_mini's example has 4 rows; 24 rows in 4 micro-batches run 6 rows each, on the ranks and in
    the eager reference, and train as eager does."""
    result, program = _written(tmp_path, "models/gpt.py:gpt_mini", stages=2, microbatches=4, global_batch=24)
    assert program.data["symbols"]["b"] == 6
    assert program.data["config"]["global_batch"] == 24
    step = next(batches(program, build_spec(program, 0), 0))
    assert [mb["idx"].shape[0] for mb in step] == [6, 6, 6, 6]
    comparison = verify_in_process(program, steps=2)
    assert comparison.ok and comparison.first_step_losses_equal, "\n".join(comparison.lines())


def test_dims_b_runs_at_that_size(tmp_path):
    """--dims b=... was costed at that size while the runtime's synthetic batches kept the
    example's rows; they now have the rows the program was compiled (and its memory planned) for."""
    _, program = _written(tmp_path, "models/mlp.py:mlp", stages=2, microbatches=2, dims={"b": 3})
    step = next(batches(program, build_spec(program, 0), 0))
    assert [tuple(mb["x"].shape) for mb in step] == [(3, 32)] * 2
    comparison = verify_in_process(program, steps=2)
    assert comparison.ok and comparison.first_step_losses_equal, "\n".join(comparison.lines())


def test_profile_measures_at_the_compiled_micro_batch():
    """With --dims, --profile ran the nodes on the example's rows: a node's scratch bytes (and
    times) were those of the example's micro-batch, not the program's."""
    sizes = {}
    for b in (4, 8):
        config = CompileConfig(
            stages=2, profile=True, profile_concurrency=1, profile_cache=None, dims={"b": b}
        )
        gm = compile_model("models/gpt.py:gpt_mini", config).gm
        sizes[b] = {
            n.name: n.meta["ppc.cost"].saved_temp_bytes for n in gm.graph.nodes if "ppc.cost" in n.meta
        }
    assert sizes[4]["matmul"] > 0
    assert sizes[8]["matmul"] == 2 * sizes[4]["matmul"]


def _choice(result):
    return {t["microbatches"]: t for t in result.program["costs"]["microbatch_choice"]}


def test_auto_compiles_every_split_and_keeps_the_fastest(tmp_path):
    config = CompileConfig(stages=2, microbatches="auto", global_batch=64, device_profile="h100")
    result = compile_model("models/gpt.py:gpt_mini", config)
    tried = _choice(result)
    assert sorted(tried) == [1, 2, 4, 8, 16, 32, 64]
    assert "at least as many microbatches as ranks" in tried[1]["rejected"]
    fitting = {M: t for M, t in tried.items() if "rejected" not in t}
    assert all(t["micro_batch_rows"] * M == 64 for M, t in fitting.items())
    best = min(fitting, key=lambda M: fitting[M]["step_seconds"])
    assert result.program["schedule"]["microbatches"] == best
    assert result.program["symbols"]["b"] == 64 // best
    # On an H100 a model this small is all per-operator overhead: more micro-batches only add some.
    assert best == 2
    assert fitting[64]["step_seconds"] > 10 * fitting[2]["step_seconds"]
    # Activations in flight under 1F1B fall as the micro-batches shrink.
    peaks = [fitting[M]["peak_bytes"] for M in sorted(fitting)]
    assert peaks == sorted(peaks, reverse=True)
    program = load_program(write_program(tmp_path / "auto", result.program, result.files))
    report = (tmp_path / "auto" / "report.md").read_text()
    assert "--microbatches auto split the global batch of 64 rows into 2 micro-batches" in report
    comparison = verify_in_process(program, steps=2)
    assert comparison.ok and comparison.first_step_losses_equal, "\n".join(comparison.lines())


def test_auto_traces_once_for_every_split_and_schedule(monkeypatch):
    """Every split, and every schedule --schedule auto tries for it, is costed from the formulas of
    one trace; each comes out as the program its own compile (tracing afresh) makes."""
    traces = []
    real_trace = driver.trace
    monkeypatch.setattr(driver, "trace", lambda ctx: traces.append(ctx) or real_trace(ctx))
    config = CompileConfig(
        stages=2, microbatches="auto", schedule="auto", global_batch=16, device_profile="h100"
    )
    result = compile_model("models/gpt.py:gpt_mini", config)
    assert len(traces) == 1
    tried = _choice(result)
    assert sorted(tried) == [1, 2, 4, 8, 16]
    for M in (2, 8):
        alone = compile_model(
            "models/gpt.py:gpt_mini", CompileConfig(**{**config.__dict__, "microbatches": M})
        )
        assert alone.program["costs"]["simulated_step_seconds"] == tried[M]["step_seconds"]
        assert alone.program["schedule"]["name"] == tried[M]["schedule"]
    assert len(traces) == 3
    chosen = result.program["schedule"]["microbatches"]
    again = compile_model(
        "models/gpt.py:gpt_mini", CompileConfig(**{**config.__dict__, "microbatches": chosen})
    )
    assert again.files == result.files | {"report.md": again.files["report.md"]}


def test_auto_under_a_budget_takes_more_micro_batches():
    """Where the fastest split's activations do not fit, the choice moves to a split that does."""
    config = CompileConfig(
        stages=2, microbatches="auto", global_batch=64, device_profile="h100", memory_per_device=8 * 2**20
    )
    result = compile_model("models/gpt.py:gpt_mini", config)
    tried = _choice(result)
    assert "--memory-per-device is 8.00 MiB" in tried[2]["rejected"]
    chosen = result.program["schedule"]["microbatches"]
    assert chosen > 2
    assert max(m["total"] for m in result.program["costs"]["memory"]) <= 8 * 2**20


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--microbatches", "auto"], ["--microbatches auto", "--global-batch N"]),
        (
            ["--global-batch", "30", "--microbatches", "8"],
            ["does not split into 8", "1, 2, 3, 5, 6, 10, 15, 30"],
        ),
        (["--microbatches", "lots"], ["--microbatches 'lots'", "or auto"]),
        (["--global-batch", "32", "--microbatches", "4", "--dims", "b=4"], ["--dims b=4", "makes b=8"]),
        (["--global-batch", "0", "--microbatches", "auto"], ["--global-batch must be at least 1"]),
        (
            ["--global-batch", "8", "--microbatches", "auto", "--dims", "b=2"],
            ["--dims sets b=2", "leave b out"],
        ),
    ],
)
def test_bad_splits_are_one_line(tmp_path, args, needles):
    out = tmp_path / "x"
    assert_user_error(ppcompile("compile", "models/mlp.py:mlp", "-k", "2", *args, "-o", str(out)), *needles)
    assert not out.exists()
