"""The memory model, the memory budget, recomputation, and measured costs."""

import dataclasses
import itertools
import json
import math
import random
import re

import pytest
import torch

from ppcompile.check_training import verify_in_process
from ppcompile.context import CompileConfig
from ppcompile.devices import PROFILES
from ppcompile.driver import compile_model
from ppcompile.errors import CompileError
from ppcompile.measure import measure_stages
from ppcompile.memory import format_bytes, parse_bytes
from ppcompile.passes import partition_stages as partition_module
from ppcompile.passes.profile_costs import profile_key
from ppcompile.program import write_program
from ppcompile.runtime.loader import load_program
from ppcompile.runtime.train import InProcessPipeline, batches, build_spec
from tests.helpers import assert_user_error, build_model, compile_to, ppcompile, tracked_step


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    for bad, needle in [("16", "has no unit"), ("lots", "not a size"), ("3XB", "unknown unit")]:
        with pytest.raises(CompileError, match=needle):
            parse_bytes(bad)


def test_bad_budgets_and_devices_are_one_line(tmp_path):
    out = str(tmp_path / "x")
    assert_user_error(
        ppcompile("compile", "models/mlp.py:mlp", "-k", "2", "--memory-per-device", "16", "-o", out),
        "has no unit",
        "16GiB",
    )
    assert_user_error(
        ppcompile("compile", "models/gpt.py:gpt_mini", "-k", "2", "--memory-per-device", "1MiB", "-o", out),
        "rank 0 needs",
        "short",
        "more --stages",
    )
    if not torch.cuda.is_available():
        assert_user_error(
            ppcompile(
                "compile", "models/mlp.py:mlp", "-k", "2", "--profile", "--profile-device", "cuda", "-o", out
            ),
            "no CUDA device",
            "--profile-device cpu",
        )
    assert not (tmp_path / "x").exists()


def test_verify_device_is_checked(monkeypatch):
    from ppcompile.devices import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("cpu", "--device") == torch.device("cpu")
    with pytest.raises(
        CompileError, match="--device cuda: torch sees no CUDA device on this machine; use --device cpu"
    ):
        check_device("cuda", "--device")
    with pytest.raises(CompileError, match="--device 'gpu0' is not a device name"):
        check_device("gpu0", "--device")


@pytest.fixture(scope="module")
def gpt_small_under_budget(tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "prog"
    result = ppcompile(
        "compile",
        "models/gpt.py:gpt_small",
        "-k",
        "4",
        "-m",
        "16",
        "--memory-per-device",
        "1.5GiB",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    return out


def test_gpt_small_recomputes_to_fit(gpt_small_under_budget):
    out = gpt_small_under_budget
    program = json.loads((out / "program.json").read_text())
    memory = program["costs"]["memory"]
    assert all(m["total"] <= parse_bytes("1.5GiB") for m in memory)
    assert program["costs"]["recomputed"], "this budget does not fit gpt_small at K=4 without recomputation"
    report = ppcompile("report", str(out)).stdout
    assert "recomputed in backward on stage 0: transformer.h.0" in report
    assert "Predicted peak memory per rank" in report
    assert (
        "torch.utils.checkpoint.checkpoint(self._recompute_transformer_h_0"
        in (out / "stage_0.py").read_text()
    )


def test_without_a_budget_nothing_is_recomputed_and_peaks_exceed_it(tmp_path):
    result = compile_model("models/gpt.py:gpt_small", CompileConfig(stages=4, microbatches=16))
    assert max(m.total for m in result.ctx.memory) > parse_bytes("1.5GiB")
    assert result.ctx.regions == []


def test_budget_that_fits_by_moving_cuts_needs_no_recompute():
    budget = parse_bytes("2.2GiB")
    result = compile_model(
        "models/gpt.py:gpt_small", CompileConfig(stages=4, microbatches=16, memory_per_device=budget)
    )
    assert result.ctx.regions == []
    assert all(m.total <= budget for m in result.ctx.memory)
    assert result.ctx.partition.cut_positions != [164, 324, 485]  # the unconstrained cuts do not fit


@pytest.mark.parametrize("schedule,budget", [("gpipe", "3.5MiB"), ("1f1b", "3.5MiB")])
def test_training_with_recomputed_layers_meets_the_bar(tmp_path, schedule, budget):
    program_dir = compile_to(
        tmp_path,
        "models/gpt.py:gpt_mini",
        2,
        microbatches=4,
        schedule=schedule,
        memory_per_device=parse_bytes(budget),
    )
    program = load_program(program_dir)
    assert program.data["costs"]["recomputed"]
    result = verify_in_process(program, steps=3, lr=0.05)
    assert result.ok, "\n".join(result.lines())


@pytest.mark.parametrize(
    "ref",
    [
        "models/gpt.py:gpt_mini",
        "models/mlp.py:mlp",
        "models/mlp.py:mlp_deep",
        # nn.LSTM and nn.GRU return tuples; what they keep of their outputs is what a later node reads.
        "tests/fixtures/unseen_rnn.py:lstm",
        "tests/fixtures/unseen_rnn.py:gru",
    ],
)
def test_predicted_activation_bytes_match_saved_tensors(tmp_path, ref):
    program, pipeline = tracked_step(compile_to(tmp_path, ref, 3, microbatches=4))
    measured = pipeline.memory().bytes_per_microbatch
    for stage, memory in enumerate(program.data["costs"]["memory"]):
        assert memory["activations_per_microbatch"] == pytest.approx(measured[stage], rel=0.05)


@pytest.mark.parametrize(
    "ref", ["tests/fixtures/zoo.py:encoder", "tests/fixtures/zoo.py:llama", "tests/fixtures/zoo.py:resnet"]
)
def test_activation_bytes_match_saved_tensors_wherever_the_cuts_fall(tmp_path, monkeypatch, ref):
    """nn.MultiheadAttention and scaled_dot_product_attention save other tensors on meta than on
    CPU (the attention weights against a log-sum-exp), chunk's items are views of one storage, and
    buffers are not activations: the prediction must hold for any stage, not only balanced ones."""
    rng = random.Random(0)

    def random_cuts(cost, K, fits=None):
        n = cost.shape[0]
        while True:
            bounds = [0, *sorted(rng.sample(range(1, n), K - 1)), n]
            if all(math.isfinite(float(cost[a, b - 1])) for a, b in itertools.pairwise(bounds)):
                return bounds[1:-1]

    monkeypatch.setattr(partition_module, "solve_partition", random_cuts)
    for trial in range(3):
        result = compile_model(ref, CompileConfig(stages=3, microbatches=3))
        program_dir = write_program(tmp_path / str(trial), result.program, result.files)
        saved = [m.saved_bytes for m in measure_stages(load_program(program_dir), repeats=1)]
        predicted = [m["activations_per_microbatch"] for m in result.program["costs"]["memory"]]
        assert predicted == pytest.approx(saved, rel=0.01), result.program["stages"]


def test_profile_is_measured_then_cached(tmp_path):
    config = CompileConfig(stages=2, microbatches=4, profile=True, profile_cache=str(tmp_path / "cache"))
    first = compile_model("models/mlp.py:mlp", config)
    assert any("measured" in n for n in first.ctx.notes)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    # One node profile, and the calibration of the stages that were timed whole.
    assert len([name for name in cached if not name.startswith("calibration-")]) == 1
    assert any(name.startswith("calibration-") for name in cached)
    second = compile_model("models/mlp.py:mlp", config)
    assert any("reused" in n for n in second.ctx.notes)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    assert first.program["costs"]["calibrated"] == second.program["costs"]["calibrated"]
    assert first.program["costs"]["stages"] == second.program["costs"]["stages"]
    # A profile cut short (a compile killed while writing it) or from another version is measured again.
    profile = next(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("calibration-"))
    for broken in (profile.read_text()[:100], '{"nodes": {}, "contention": {"ranks": 2, "renamed": 1}}'):
        profile.write_text(broken)
        again = compile_model("models/mlp.py:mlp", config)
        assert any("measured" in n for n in again.ctx.notes)
        assert json.loads(profile.read_text())["nodes"]
    assert first.program["config"]["costs_measured_on"] == "cpu"
    # Measured times replace the roofline: no node costs the same as in the roofline profile.
    roofline = compile_model("models/mlp.py:mlp", CompileConfig(stages=2, microbatches=4))
    assert first.program["costs"]["stages"] != roofline.program["costs"]["stages"]


def test_profile_on_cpu_measures_busy_ranks_and_their_link(tmp_path):
    """K ranks share this CPU: the profile times them busy together and measures their link, and the
    partitioner and simulated step use that link; --profile-concurrency 1 times alone."""
    shared = compile_model(
        "models/mlp.py:mlp",
        CompileConfig(stages=2, microbatches=4, profile=True, profile_cache=str(tmp_path / "a")),
    )
    link = shared.program["costs"]["link"]
    assert any("2 ranks busy at once" in n for n in shared.ctx.notes)
    assert link["latency_seconds"] != PROFILES["cpu"].link_latency
    assert 0 < link["latency_seconds"] < 0.1 and link["bandwidth_bytes_per_second"] > 1e6
    # A send costs its rank its own call; the simulator charges it (the roofline profile: nothing).
    assert 0 < link["send_seconds"] < link["latency_seconds"] + 0.01
    assert 0 < link["idle_latency_seconds"] < 0.1  # to a rank blocked on the receive
    # The machine's cores, and how much faster one rank runs on all of them: with --spare-cores, the
    # long actions in the bubbles get every core (ppcompile/spare_cores.py).
    profile = next(p for p in (tmp_path / "a").iterdir() if not p.name.startswith("calibration-"))
    contention = json.loads(profile.read_text())["contention"]
    assert contention["cores"] >= 1 and contention["spare_core_speedup"] > 0
    assert shared.ctx.spare_cores is None and "spare_cores" not in shared.program  # off by default
    planned = compile_model(
        "models/mlp.py:mlp",
        CompileConfig(
            stages=2, microbatches=4, profile=True, profile_cache=str(tmp_path / "a"), spare_cores=True
        ),
    )
    if contention["cores"] > 1 and contention["spare_core_speedup"] > 1:
        assert planned.ctx.spare_cores == (contention["cores"], contention["spare_core_speedup"])
    assert "spare_cores" not in planned.program  # mlp's actions are far too short to hand cores to
    alone = compile_model(
        "models/mlp.py:mlp",
        CompileConfig(
            stages=2, microbatches=4, profile=True, profile_concurrency=1, profile_cache=str(tmp_path / "b")
        ),
    )
    assert not any("busy at once" in n for n in alone.ctx.notes)
    assert alone.program["costs"]["link"]["latency_seconds"] == PROFILES["cpu"].link_latency
    assert alone.program["costs"]["link"]["send_seconds"] == 0
    assert alone.program["costs"]["link"]["idle_latency_seconds"] is None


def test_bad_profile_concurrency_is_one_line(tmp_path):
    run = ppcompile(
        "compile",
        "models/mlp.py:mlp",
        "-k",
        "2",
        "--profile",
        "--profile-concurrency",
        "0",
        "-o",
        tmp_path / "x",
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "error: --profile-concurrency must be at least 1, got 0; 1 times every node alone"
    )
    assert not (tmp_path / "x").exists()


def test_cost_formulas_rebalance_for_another_microbatch_shape():
    """--dims b=2,s=16 costs gpt_mini from its formulas exactly as tracing it at that shape does."""
    from_formulas = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=3, dims={"b": 2, "s": 16}))
    traced = compile_model("tests/fixtures/gpt_shapes.py:gpt_mini_b2_s16", CompileConfig(stages=3))
    a, b = from_formulas.program["costs"]["stages"], traced.program["costs"]["stages"]
    for key in ("forward_flops", "backward_flops", "activation_bytes", "sent_bytes"):
        assert [s[key] for s in a] == pytest.approx([s[key] for s in b], rel=1e-9), key
    assert from_formulas.ctx.partition.cut_positions == traced.ctx.partition.cut_positions
    formulas = from_formulas.program["costs"]["stages"][1]["formulas"]
    assert "b*s**2" in formulas["forward_flops"]  # attention is quadratic in the sequence


def test_cost_formulas_rescale_tuple_outputs():
    """nn.LSTM's (output, (h, c)) has no single shape: --dims b=8 rescales its bytes from a
    fitted formula, and the memory plan matches tracing the model at that shape."""
    from_formulas = compile_model("tests/fixtures/unseen_rnn.py:lstm", CompileConfig(stages=2, dims={"b": 8}))
    traced = compile_model("tests/fixtures/unseen_rnn.py:lstm_b8", CompileConfig(stages=2))
    assert from_formulas.ctx.partition.cut_positions == traced.ctx.partition.cut_positions
    a, b = from_formulas.program["costs"]["memory"], traced.program["costs"]["memory"]
    for key in ("activations_per_microbatch", "transfers", "working", "total"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-9), key


def test_a_frozen_layer_computes_no_weight_gradient():
    # Costs are measured once per distinct node; a frozen Linear took the cost of its trained twin
    # of the same shape (or the other way round) when trainability was not part of what is alike.
    result = compile_model("tests/fixtures/fine_tuning.py:alternate_blocks_frozen", CompileConfig(stages=1))
    costs = {n.target: n.meta["ppc.cost"] for n in result.gm.graph.nodes if n.op == "call_module"}
    for block in range(6):
        linear = costs[f"blocks.{block}.1"]
        # The input's gradient costs as much as the forward; a trained layer's weight gradient again.
        assert linear.backward_flops == linear.forward_flops * (1 if block % 2 else 2), block
        # Its backward's memory traffic counts the same gradients: the input's, then the weights'.
        assert linear.backward_traffic == (1 if block % 2 else 2), block
    # The first layer, fed by data, computes its weights' gradient alone.
    assert costs["inp"].backward_traffic == 1 and costs["head"].backward_traffic == 2


def test_a_profile_is_measured_again_when_layers_are_frozen():
    result = compile_model("tests/fixtures/fine_tuning.py:alternate_blocks_frozen", CompileConfig(stages=1))
    key = profile_key(result.gm, result.ctx, torch.device("cpu"))
    result.gm.get_submodule("blocks.0").requires_grad_(False)
    assert profile_key(result.gm, result.ctx, torch.device("cpu")) != key


def test_frozen_parameters_are_held_without_gradients_or_optimizer_state():
    result = compile_model("tests/fixtures/fine_tuning.py:frozen_backbone", CompileConfig(stages=2))
    model, _ = build_model("tests/fixtures/fine_tuning.py:frozen_backbone")
    trained = {name: p.numel() * p.element_size() for name, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == {"head.weight", "head.bias"}
    first, last = result.ctx.memory
    assert first.gradients == first.optimizer == first.update == 0 < first.parameters
    assert last.gradients == sum(trained.values())
    # Counted with gradients and AdamW's moments, the frozen backbone's rank needed 2.86 MiB.
    budget = 1500 * 1024
    fitted = compile_model(
        "tests/fixtures/fine_tuning.py:frozen_backbone", CompileConfig(stages=2, memory_per_device=budget)
    )
    assert max(m.total for m in fitted.ctx.memory) <= budget


def test_dims_must_name_known_symbols(tmp_path):
    assert_user_error(
        ppcompile("compile", "models/mlp.py:mlp", "-k", "2", "--dims", "s=4", "-o", str(tmp_path / "x")),
        "symbolic dims are b",
    )
    assert_user_error(
        ppcompile("compile", "models/mlp.py:mlp", "-k", "2", "--dims", "b=x", "-o", str(tmp_path / "x")),
        "b=8",
    )


def test_a_dim_past_an_inputs_rank_is_one_clear_error(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(
        "import torch\nfrom torch import nn\nfrom ppcompile import ModelSpec\n\n\n"
        "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(4, 4)\n\n    def forward(self, x):\n        return self.fc(x).sum()\n\n\n"
        "def factory():\n    return ModelSpec(M(), (torch.randn(2, 4),), dims={'x': {0: 'b', 2: 's'}})\n"
    )
    assert_user_error(
        ppcompile("compile", f"{model}:factory", "-k", "2", "-o", str(tmp_path / "x")),
        "ModelSpec.dims gives input 'x' dim 2 ('s'), but its example has 2 dims; name dims 0..1",
    )


def _peak_allocated(fn) -> int:
    """The most CPU memory that tensors allocated inside ``fn`` held at once, from the profiler's
    allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_stage_frees_each_value_after_its_last_use(tmp_path):
    # A generated forward that kept every intermediate until it returned held gpt_mini's attention
    # scores (before and after masking and scaling) through the whole forward: 1.45x the eager
    # model's peak on one micro-batch, 1.6 GiB more than eager for gpt_small on a GPU.
    program = load_program(compile_to(tmp_path, "models/gpt.py:gpt_mini", 1))
    source = (program.root / "stage_0.py").read_text()
    assert "del " in source
    model, inputs = build_model("models/gpt.py:gpt_mini")
    stage = program.stage_class(0)(model)

    def step(forward):
        loss = forward(*inputs)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()

    step(model)  # the gradients exist in both runs below
    eager, staged = _peak_allocated(lambda: step(model)), _peak_allocated(lambda: step(stage))
    assert staged <= eager * 1.02, (staged, eager)


@pytest.mark.parametrize(
    "ref",
    [
        "models/gpt.py:gpt_mini",
        "models/mlp.py:mlp",
        "tests/fixtures/gpt_shapes.py:gpt_wide_vocab",
        # Peaks in AdamW's step, which on a CPU holds two temporaries the size of the largest parameter.
        "tests/fixtures/unseen_wide.py:factory",
        # nn.LSTM returns a tuple, which was counted as allocating nothing: its backward sets the peak.
        "tests/fixtures/unseen_rnn.py:lstm",
        # Frozen parameters are held, with no gradient, no AdamW moments and no step temporaries.
        "tests/fixtures/fine_tuning.py:frozen_backbone",
        "tests/fixtures/fine_tuning.py:lora",
    ],
)
def test_predicted_peak_matches_the_allocations_of_a_step(tmp_path, ref):
    program = load_program(compile_to(tmp_path, ref, 1, microbatches=4))
    measured = _measured_step_peak(program, "adamw")
    predicted = program.data["costs"]["memory"][0]["total"]
    if "unseen_rnn" in ref:
        # nn.LSTM's CPU kernels do not allocate the same from one step or process to the next: its
        # step measured 465.0 KB, then 408.4 KB on every later step of one process, and 399.5 and
        # 443.6 KB after other tests, against 466.0 predicted. The plan must cover the largest.
        assert measured <= predicted * 1.02 and predicted <= measured * 1.18, (predicted, measured)
    else:
        assert predicted == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adam", "rmsprop", "adagrad"])
@pytest.mark.parametrize(
    "ref",
    [
        # Activations set the peak.
        "models/gpt.py:gpt_mini",
        # The optimizer's step sets it where the step makes temporaries: a root of the state.
        "tests/fixtures/unseen_wide.py:factory",
    ],
)
def test_each_optimizer_state_and_step_are_counted(tmp_path, ref, optimizer):
    program = load_program(compile_to(tmp_path, ref, 1, microbatches=4, optimizer=optimizer))
    measured = _measured_step_peak(program, optimizer)
    assert program.data["costs"]["memory"][0]["total"] == pytest.approx(measured, rel=0.05)


def test_every_optimizer_the_runtime_offers_is_sized():
    from ppcompile.memory import OPTIMIZER_MEMORY
    from ppcompile.runtime.train import OPTIMIZERS

    assert OPTIMIZER_MEMORY.keys() == OPTIMIZERS.keys()


def _measured_step_peak(program, optimizer: str) -> float:
    """A one-rank program's peak in a training step: the static bytes held before the step
    (parameters, the optimizer's state as it holds it, buffers; the gradients were set to None)
    plus the most the step's tensors held at once, working tensors included."""
    pipeline = InProcessPipeline(program, optimizer=optimizer)
    microbatches = next(batches(program, pipeline.spec, 0))
    pipeline.step(microbatches)  # the optimizer's state exists from here on
    # The step sets them to None first; freed inside the profile, the profiler counts some blocks
    # made before it and not others (the measured peak then moved by a parameter's size).
    pipeline.optimizers[0].zero_grad(set_to_none=True)
    executor = pipeline.executors[0]
    held = sum(p.numel() * p.element_size() for p in executor.parameters())
    held += sum(b.numel() * b.element_size() for m in executor.stages.values() for b in m.buffers())
    held += sum(
        t.numel() * t.element_size()
        for state in pipeline.optimizers[0].state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    return held + _peak_allocated(lambda: pipeline.step(microbatches))


def test_optimizer_step_temporaries_can_set_the_peak(tmp_path):
    # mlp's activations are small beside its parameters: on a GPU, AdamW's foreach step computes
    # the second moment's square root for every parameter at once, and that is the peak.
    gpu = compile_model("models/mlp.py:mlp", CompileConfig(stages=2, device_profile="h100"))
    cpu = compile_model("models/mlp.py:mlp", CompileConfig(stages=2))
    model, _ = build_model("models/mlp.py:mlp")
    sizes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    largest = [max(sizes[name] for name in stage["parameters"]) for stage in cpu.program["stages"]]
    for stage, (on_gpu, on_cpu) in enumerate(zip(gpu.ctx.memory, cpu.ctx.memory)):
        assert on_gpu.update == on_gpu.parameters  # every parameter at once
        # One parameter at a time: the square root of its second moment and that divided, together.
        assert on_cpu.update == 2 * largest[stage]
        static = on_gpu.parameters + on_gpu.gradients + on_gpu.optimizer + on_gpu.buffers + on_gpu.transfers
        assert on_gpu.update > on_gpu.activations + on_gpu.working
        assert on_gpu.total == pytest.approx(static + on_gpu.update)
    write_program(tmp_path / "p", gpu.program, gpu.files)
    report = ppcompile("report", str(tmp_path / "p")).stdout
    assert "rank 0 peaks in the optimizer step, whose temporaries" in report


UNSEEN_CNN = "tests/fixtures/unseen_cnn_batchnorm.py:factory"
NORM_BLOCKS = "tests/fixtures/unseen_norm_blocks.py"


@pytest.mark.parametrize("stages,budget", [(2, "1.9MiB"), (4, "2044946B")])
def test_budgets_that_crashed_the_memory_plan_fit(stages, budget):
    """The partitioner called cuts fitting that plan_memory found over budget; where those were also
    the fastest cuts, plan_memory crashed on a plan it never made."""
    limit = parse_bytes(budget)
    result = compile_model(UNSEEN_CNN, CompileConfig(stages=stages, memory_per_device=limit))
    assert all(m.total <= limit for m in result.ctx.memory)


def test_a_budget_no_cuts_meet_is_one_line_naming_the_layers_that_update_buffers():
    # Every other block counts its calls in a buffer: those may not be recomputed, and the error says so.
    with pytest.raises(CompileError) as error:
        compile_model(f"{NORM_BLOCKS}:counting", CompileConfig(stages=2, memory_per_device=1_600_000))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert (
        "even recomputing in backward every layer but blocks.1, blocks.3, which update buffers in forward"
        in message
    )


def test_a_cut_inside_a_recomputed_layer_passes_what_it_receives_to_the_region(tmp_path):
    """The cut falls after block 2's first norm, and block 2 is recomputed: the stage after the cut
    recomputes the rest of it from the norm's output it received."""
    program_dir = compile_to(
        tmp_path, "tests/fixtures/zoo.py:llama", 2, microbatches=4, memory_per_device=parse_bytes("822KiB")
    )
    code = (program_dir / "stage_1.py").read_text()
    assert "def _recompute_blocks_2(self, blocks_2_norm1, " in code
    assert "blocks_2_norm1: [b, s, 32] float32, received from stage 0" in code
    result = verify_in_process(load_program(program_dir), steps=2, lr=0.05)
    assert result.ok, "\n".join(result.lines())


def test_cuts_are_searched_again_with_layers_recomputed(tmp_path):
    """At this budget the encoder's fastest cuts do not fit even recomputing every block, and no
    cuts fit without recomputation; other cuts with blocks recomputed do, and train as eager."""
    budget = 530_000
    encoder = "tests/fixtures/zoo.py:encoder"
    result = compile_model(encoder, CompileConfig(stages=2, memory_per_device=budget))
    assert result.ctx.regions
    assert all(m.total <= budget for m in result.ctx.memory)
    fastest = compile_model(encoder, CompileConfig(stages=2)).ctx.partition.cut_positions
    assert result.ctx.partition.cut_positions != fastest
    program = load_program(write_program(tmp_path / "p", result.program, result.files))
    outcome = verify_in_process(program, steps=2, lr=0.05)
    assert outcome.ok, "\n".join(outcome.lines())


def test_nodes_that_update_buffers_are_marked():
    graph = compile_model("tests/fixtures/zoo.py:encoder", CompileConfig(stages=1)).gm.graph
    writers = {n.target for n in graph.nodes if n.meta.get("ppc.writes_buffers")}
    assert writers == {"add_", "bn"}  # self.steps.add_(1), and BatchNorm1d's running statistics


def _buffers_after_a_step(program):
    """Every buffer after one in-process training step of ``program``, and the eager model's after
    the same micro-batches."""
    pipeline = InProcessPipeline(program, seed=0, optimizer="sgd", lr=0.01)
    microbatches = next(batches(program, pipeline.spec, 0))
    pipeline.step(microbatches)
    compiled = {n: b for e in pipeline.executors for m in e.stages.values() for n, b in m.named_buffers()}
    eager = build_spec(program, 0).module
    names = [i["name"] for i in program.data["inputs"]]
    for microbatch in microbatches:
        eager(*(microbatch[n] for n in names)).backward()
    return compiled, dict(eager.named_buffers())


def test_layers_whose_code_updates_buffers_are_never_recomputed(tmp_path):
    """A block that counts its calls (``self.calls.add_(1)``) would count twice if it ran again in
    backward: the LayerNorm blocks beside it are recomputed, and it is not."""
    budget = 1_700_000
    result = compile_model(f"{NORM_BLOCKS}:counting", CompileConfig(stages=2, memory_per_device=budget))
    recomputed = {r.name for r in result.ctx.regions}
    assert recomputed and not recomputed & {"blocks.1", "blocks.3", "blocks.5"}
    assert all(m.total <= budget for m in result.ctx.memory)
    notes = " ".join(result.program["costs"]["notes"])
    assert "blocks.1, blocks.3 on stage 0: not recomputed in backward, since their own code updates" in notes
    program = load_program(write_program(tmp_path / "p", result.program, result.files))
    compiled, eager = _buffers_after_a_step(program)
    assert compiled.keys() == eager.keys()
    for name, value in compiled.items():
        assert torch.allclose(value.double(), eager[name].double(), rtol=1e-6, atol=0), name


@pytest.mark.parametrize(
    "ref, batchnorm_blocks", [(f"{NORM_BLOCKS}:mixed", ["blocks.1"]), (UNSEEN_CNN, None)]
)
def test_batchnorm_layers_recomputed_update_their_statistics_once(tmp_path, ref, batchnorm_blocks):
    """Recomputing a BatchNorm block in backward once ran its forward twice: it counted its batches
    twice and moved its running statistics by the same micro-batch again. Its recomputation now gets
    the statistics as forward found them and leaves them as they were."""
    budget = 1_600_000
    result = compile_model(ref, CompileConfig(stages=2, memory_per_device=budget))
    recomputed = [r.name for r in result.ctx.regions]
    expected = batchnorm_blocks or ["blocks.1", "blocks.3"]
    assert set(expected) <= set(recomputed), recomputed
    assert all(m.total <= budget for m in result.ctx.memory)
    program = load_program(write_program(tmp_path / "p", result.program, result.files))
    compiled, eager = _buffers_after_a_step(program)
    assert compiled.keys() == eager.keys()
    for name, value in compiled.items():
        assert torch.allclose(value.double(), eager[name].double(), rtol=1e-6, atol=0), name
    outcome = verify_in_process(program, steps=2, lr=0.05)
    assert outcome.ok and outcome.worst_buffer is not None, "\n".join(outcome.lines())
    code = "".join(result.files[f"stage_{s}.py"] for s in range(2))
    module = "self.blocks[1].norm" if batchnorm_blocks else "self.blocks[1].bn"
    assert f"context_fn=lambda: ppcompile.runtime.recompute.buffers_as_in_forward({module})" in code


def test_recomputed_blocks_train_as_eager_when_backward_is_split(tmp_path):
    """zb-h1 splits each backward into I and W; a block ending in a ReLU was recomputed in I from
    the ReLU and its inputs freed there, so W's recomputation of its linear layer failed."""
    budget = 1_550_000
    result = compile_model(
        f"{NORM_BLOCKS}:layernorm",
        CompileConfig(stages=2, schedule="zb-h1", microbatches=4, memory_per_device=budget),
    )
    assert len(result.ctx.regions) >= 4 and all(m.total <= budget for m in result.ctx.memory)
    program = load_program(write_program(tmp_path / "p", result.program, result.files))
    outcome = verify_in_process(program, steps=2, lr=0.05)
    assert outcome.ok, "\n".join(outcome.lines())


def test_each_call_of_a_shared_layer_is_a_region_of_its_own(tmp_path):
    """Two calls of one block, both recomputed, once made one region of that name: the stage code
    recomputed both calls in one checkpoint at the first, before the second's input existed."""
    result = compile_model(f"{NORM_BLOCKS}:shared", CompileConfig(stages=2, memory_per_device=1_388_748))
    names = [r.name for r in result.ctx.regions]
    assert len(names) >= 2 and len(set(names)) == len(names)
    assert names[:2] == ["blocks.0", "blocks.0 call 2"] and all(n.startswith("blocks.0") for n in names)
    program = load_program(write_program(tmp_path / "p", result.program, result.files))
    outcome = verify_in_process(program, steps=2, lr=0.05)
    assert outcome.ok, "\n".join(outcome.lines())


def test_recomputed_regions_report_what_they_free(tmp_path):
    """A block's ReLU saves its output, which the next block keeps as its input: recomputing the
    block does not free it. Each region records what it freed beside those chosen before it, so a
    stage's figures add up to its activations' drop, which the report prints."""
    budget = 1_700_000
    result = compile_model(f"{NORM_BLOCKS}:layernorm", CompileConfig(stages=2, memory_per_device=budget))
    costs = result.program["costs"]
    assert costs["recomputed"]
    for stage, memory in enumerate(costs["memory"]):
        freed = sum(r["saved_bytes"] for r in costs["recomputed"] if r["stage"] == stage)
        drop = costs["stages"][stage]["activation_bytes"] - memory["activations_per_microbatch"]
        assert freed == pytest.approx(drop)
        if freed:
            assert f"(frees {format_bytes(drop)} per micro-batch" in result.files["report.md"]
    # What the plan says a recomputing stage saves is what autograd keeps.
    program, pipeline = tracked_step(write_program(tmp_path / "p", result.program, result.files))
    measured = pipeline.memory().bytes_per_microbatch
    for stage, memory in enumerate(costs["memory"]):
        assert memory["activations_per_microbatch"] == pytest.approx(measured[stage], rel=0.05)


def test_does_not_fit_lists_parts_that_add_up():
    with pytest.raises(CompileError) as error:
        compile_model(
            "models/gpt.py:gpt_mini", CompileConfig(stages=2, memory_per_device=parse_bytes("1MiB"))
        )
    message = str(error.value)
    assert len(message.splitlines()) == 1
    total = parse_bytes(re.search(r"needs ([\d.]+ \w+)", message).group(1))
    parts = re.search(r"short \((.*)\); use", message).group(1).split(", ")
    assert {"parameters+gradients+optimizer", "transfers", "activations"} <= {p.split()[0] for p in parts}
    # Each part's last figure is its bytes ("activations 65.00 KiB x 2 = 130.00 KiB").
    listed = sum(parse_bytes(" ".join(p.split()[-2:])) for p in parts)
    assert listed == pytest.approx(total, rel=0.005)


LAYOUTS = "tests/fixtures/recompute_layouts.py"


def _squeezed(tmp_path, ref: str, share: float):
    """The model compiled at K=2 under ``share`` of its unplanned peak, and its verify result."""
    config = CompileConfig(stages=2, microbatches=4)
    peak = max(m["total"] for m in compile_model(ref, config).program["costs"]["memory"])
    result = compile_model(ref, dataclasses.replace(config, memory_per_device=int(peak * share)))
    assert all(m.total <= peak * share for m in result.ctx.memory)
    program = load_program(write_program(tmp_path / "p", result.program, result.files))
    return result, verify_in_process(program, steps=2, lr=0.05)


def test_a_shared_sequential_block_is_recomputed_call_by_call_whole(tmp_path):
    """ALBERT's one block, an nn.Sequential called six times: each call is one region holding the
    whole block (its LayerNorm, Linear, GELU and Linear), not its items one by one, which free
    next to nothing alone."""
    result, outcome = _squeezed(tmp_path, f"{LAYOUTS}:shared_sequential", 0.65)
    assert [r.name for r in result.ctx.regions][:3] == ["block", "block call 2", "block call 3"]
    assert all(len(r.nodes) == 4 for r in result.ctx.regions)
    assert outcome.ok, "\n".join(outcome.lines())


def test_neighbouring_layers_are_recomputed_together_where_alone_they_free_nothing(tmp_path):
    """A flat nn.Sequential of Linear, GELU, Linear, Tanh: recomputing one item keeps its input,
    which its neighbour saved anyway. Neighbours recomputed as one region keep only the first's
    input, as torch.utils.checkpoint of a run of items does; before, every budget under the
    unplanned peak was refused."""
    result, outcome = _squeezed(tmp_path, f"{LAYOUTS}:flat", 0.7)
    merged = [r.name for r in result.ctx.regions if " .. " in r.name]
    assert merged and merged[0].startswith("net.0 .. net.")
    assert all(r.saved_bytes > 0 for r in result.ctx.regions)
    assert outcome.ok, "\n".join(outcome.lines())


def test_blocks_held_as_named_attributes_can_be_recomputed(tmp_path):
    result, outcome = _squeezed(tmp_path, f"{LAYOUTS}:named_blocks", 0.6)
    assert {r.name.split(".")[0] for r in result.ctx.regions} >= {"enc1", "enc2"}
    assert outcome.ok, "\n".join(outcome.lines())


def test_a_block_that_changes_its_input_in_place_is_recomputed_from_a_copy(tmp_path):
    """``x += self.shift`` at a block's start writes the tensor the block before returned. The
    recomputing method copies it first: run again in backward from the written input, the block
    would add the shift twice, and autograd refuses the saved input changed since."""
    result, outcome = _squeezed(tmp_path, f"{LAYOUTS}:shifted_input", 0.8)
    assert any(r.name.startswith("blocks.") for r in result.ctx.regions)
    code = "\n".join(text for name, text in result.files.items() if name.endswith(".py"))
    assert ".clone()  # a copy: changed in place below" in code
    assert outcome.ok, "\n".join(outcome.lines())


def test_a_block_that_changes_a_view_of_its_input_is_not_recomputed():
    """``x[:, :1] += ...`` writes the block's input through a slice: a copy would hide the write
    from whatever else reads the input, so the block is left out, and the error says why."""
    config = CompileConfig(stages=2, microbatches=4)
    peak = max(
        m["total"] for m in compile_model(f"{LAYOUTS}:token_written", config).program["costs"]["memory"]
    )
    with pytest.raises(CompileError) as error:
        compile_model(
            f"{LAYOUTS}:token_written", dataclasses.replace(config, memory_per_device=int(peak * 0.8))
        )
    assert len(str(error.value).splitlines()) == 1
    assert "which change a view of their input in place" in str(error.value)
