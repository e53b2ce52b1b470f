"""Every schedule, compiled and trained: the correctness bar, memory in flight, bad input."""

import json
import subprocess

import pytest
import torch

from ppcompile.check_training import compare, eager_run, verify_in_process
from ppcompile.replay import simulate_program
from ppcompile.runtime.loader import load_program
from tests.helpers import compile_to, ppcompile, torchrun_command, tracked_step

CONFIGS = [
    ("gpipe", 2, 1, 4),
    ("1f1b", 3, 1, 4),
    ("zb-h1", 2, 1, 4),
    ("zb-h1", 4, 1, 6),
    ("interleaved-1f1b", 2, 2, 4),
    ("interleaved-1f1b", 2, 3, 6),
    ("interleaved-1f1b", 3, 2, 6),
]


@pytest.mark.parametrize(
    "ref", ["models/gpt.py:gpt_mini", "models/mlp.py:mlp_deep", "tests/fixtures/zoo.py:encoder"]
)
@pytest.mark.parametrize("schedule,K,V,M", CONFIGS)
def test_every_schedule_trains_like_eager(tmp_path, ref, schedule, K, V, M):
    program = load_program(compile_to(tmp_path, ref, K, microbatches=M, schedule=schedule, virtual_stages=V))
    assert program.num_stages == K * V and program.num_ranks == K
    result = verify_in_process(program, steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())


def _peak_live(program_dir):
    program, pipeline = tracked_step(program_dir)
    measured = pipeline.memory().peak_live_microbatches
    predicted = json.loads((program_dir / "program.json").read_text())["costs"]["memory"]
    return [measured[s] for s in range(program.num_stages)], [m["live_microbatches"] for m in predicted]


def test_zb_h1_holds_what_1f1b_holds_at_its_peak(tmp_path):
    """Counted through saved_tensors_hooks: ZB-H1 keeps a micro-batch until its W, so each stage holds
    K at most; its worst stage holds exactly what 1F1B's first stage holds (K)."""
    K, M = 4, 8
    zb, zb_predicted = _peak_live(
        compile_to(tmp_path / "zb", "models/gpt.py:gpt_mini", K, microbatches=M, schedule="zb-h1")
    )
    ofob, _ = _peak_live(
        compile_to(tmp_path / "1f1b", "models/gpt.py:gpt_mini", K, microbatches=M, schedule="1f1b")
    )
    assert zb == zb_predicted
    assert ofob == [K - s for s in range(K)]
    assert max(zb) == max(ofob) == K
    assert all(z <= K for z in zb)


def test_interleaved_holds_megatron_count(tmp_path):
    """Megatron-LM's interleaved schedule: rank r keeps (V-1)K + 2(K-r-1) + 1 chunks of activations
    in flight at most (Korthikanti et al.: rank 0 holds K(1 + (K-1)/(VK)) micro-batches' worth)."""
    K, V, M = 2, 2, 4
    program_dir = compile_to(
        tmp_path, "models/gpt.py:gpt_mini", K, microbatches=M, schedule="interleaved-1f1b", virtual_stages=V
    )
    measured, predicted = _peak_live(program_dir)
    assert measured == predicted  # per stage, counted at run time
    per_rank = simulate_program(json.loads((program_dir / "program.json").read_text())).peak_live_per_rank
    assert list(per_rank) == [min((V - 1) * K + 2 * (K - r - 1) + 1, V * M) for r in range(K)]


@pytest.mark.parametrize("schedule,V", [("interleaved-1f1b", 2), ("zb-h1", 1)])
def test_torchrun_new_schedules(tmp_path, schedule, V):
    program_dir = compile_to(
        tmp_path, "models/gpt.py:gpt_mini", 2, microbatches=4, schedule=schedule, virtual_stages=V
    )
    record = tmp_path / "record"
    command = torchrun_command(
        program_dir, 2, "--steps", "3", "--optimizer", "sgd", "--lr", "0.05", "--record", str(record)
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(record / f"rank{r}.pt") for r in range(2)]
    losses = next(r["losses"] for r in ranks if r["losses"])
    grads = {n: g for r in ranks for n, g in r["grads"].items()}
    params = {n: p for r in ranks for n, p in r["params"].items()}
    comparison = compare(losses, grads, params, eager_run(load_program(program_dir), 3, "sgd", 0.05, 0))
    assert comparison.ok, "\n".join(comparison.lines())


@pytest.mark.parametrize(
    "args,needles",
    [
        (
            ["-k", "2", "-v", "2", "--schedule", "interleaved-1f1b", "-m", "3"],
            ["multiple of K=2", "M=2 or 4"],
        ),
        (["-k", "2", "-v", "2", "--schedule", "1f1b"], ["interleaved-1f1b"]),
        (["-k", "2", "-v", "1", "--schedule", "interleaved-1f1b", "-m", "4"], ["1f1b"]),
        (
            # 1,024 stages: more than the cuts between nodes, linear layers' bands of columns included.
            ["-k", "4", "-v", "256", "--schedule", "interleaved-1f1b", "-m", "4"],
            ["--virtual-stages 256", "places it can be cut", "bands of columns"],
        ),
        (["-k", "2", "--schedule", "zigzag"], ["zigzag", "zb-h1", "interleaved-1f1b", "forward-only"]),
    ],
)
def test_bad_schedule_requests_are_one_line(tmp_path, args, needles):
    result = ppcompile("compile", "models/mlp.py:mlp", *args, "-o", str(tmp_path / "x"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_auto_picks_the_fastest_schedule_that_fits(tmp_path):
    out = tmp_path / "auto"
    result = ppcompile(
        "compile", "models/gpt.py:gpt_mini", "-k", "2", "-m", "4", "--schedule", "auto", "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    program = json.loads((out / "program.json").read_text())
    tried = [t for t in program["costs"]["auto"] if "rejected" not in t]
    best = min(tried, key=lambda t: t["step_seconds"])
    assert (program["schedule"]["name"], program["schedule"]["virtual_stages"]) == (
        best["schedule"],
        best["virtual_stages"],
    )
    assert "--schedule auto chose" in (out / "report.md").read_text()


def test_simulate_command_prints_and_writes_a_trace(tmp_path):
    out = tmp_path / "z"
    assert (
        ppcompile(
            "compile", "models/gpt.py:gpt_mini", "-k", "2", "-m", "4", "--schedule", "zb-h1", "-o", str(out)
        ).returncode
        == 0
    )
    trace = tmp_path / "pred.json"
    result = ppcompile("simulate", str(out), "--trace", str(trace))
    assert result.returncode == 0, result.stderr
    assert "predicted step" in result.stdout and "rank 1: busy" in result.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["cat"] for e in events if e.get("ph") == "X"} >= {"F", "I", "W"}
    png = tmp_path / "t.png"
    pytest.importorskip("matplotlib")
    assert ppcompile("simulate", str(out), "--png", str(png)).returncode == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
