"""The partitioner is optimal for its cost model (checked against brute force on small problems), and
its memory check counts what the memory plan counts."""

import itertools
import math
import operator
import random

import pytest
import torch

from ppcompile.context import CompileConfig
from ppcompile.driver import compile_model
from ppcompile.passes import partition_stages as partition_module
from ppcompile.passes.partition_stages import (
    CrossingValue,
    assign_stages,
    best_compute_balance,
    compute_order,
    memory_fits,
    partition_problem,
    partition_stages,
    segment_costs,
    solve_partition,
    stage_times_for,
)
from ppcompile.passes.plan_memory import candidate_regions, recomputed_segment_memory, stage_memory
from ppcompile.report import render_report


def naive_stage_cost(i, j, times, values, send_call=0.0):
    """Stage i..j: its compute plus every value entering or leaving it, and one send call per cut
    it borders, written the obvious way."""
    total = sum(times[i : j + 1]) + send_call * ((i > 0) + (j < len(times) - 1))
    for v in values:
        inside_producer = i <= v.producer <= j
        uses_inside = any(i <= c <= j for c in v.consumers)
        uses_after = any(c > j for c in v.consumers)
        if (not inside_producer and v.producer < i and uses_inside) or (inside_producer and uses_after):
            total += v.transfer_time
    return total


def random_problem(rng, n):
    times = [rng.uniform(0.1, 3.0) for _ in range(n)]
    values = []
    for p in range(n - 1):
        consumers = sorted(rng.sample(range(p + 1, n), rng.randint(1, min(3, n - 1 - p))))
        values.append(CrossingValue(p, tuple(consumers), rng.uniform(0.0, 1.5)))
    forbidden = {c for c in range(1, n) if rng.random() < 0.15}
    return times, values, forbidden


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    K = rng.randint(1, min(4, n))
    times, values, forbidden = random_problem(rng, n)
    send_call = rng.choice([0.0, rng.uniform(0.0, 1.0)])
    cost = segment_costs(times, values, forbidden, send_call)
    for i in range(n):
        for j in range(i, n):
            legal = (i == 0 or i not in forbidden) and (j == n - 1 or j + 1 not in forbidden)
            expected = naive_stage_cost(i, j, times, values, send_call) if legal else math.inf
            assert float(cost[i, j]) == pytest.approx(expected)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), K - 1):
        if any(c in forbidden for c in cuts):
            continue
        bounds = [0, *cuts, n]
        stages = [naive_stage_cost(bounds[s], bounds[s + 1] - 1, times, values, send_call) for s in range(K)]
        best = min(best, max(stages))
    found = solve_partition(cost, K)
    if not math.isfinite(best):
        assert found is None
        return
    assert len(found) == K - 1 and found == sorted(set(found))
    assert max(stage_times_for(cost, found)) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_under_a_budget(seed):
    """The solver searches a band of stage starts bounded by a partition found without search;
    where a budget rules that partition out, the band widens, or a boolean check finds no cut fits.
    Either way its bottleneck and cuts are the exhaustive search's."""
    rng = random.Random(1000 + seed)
    n = rng.randint(6, 14)
    K = rng.randint(2, min(5, n))
    times, values, forbidden = random_problem(rng, n)
    cost = segment_costs(times, values, forbidden, rng.uniform(0.0, 0.5))
    generator = torch.Generator().manual_seed(seed)
    share = rng.choice([0.3, 0.6, 0.9])
    masks = [torch.rand(n, n, generator=generator) < share for _ in range(K)]
    best, best_cuts = math.inf, None
    for cuts in itertools.combinations(range(1, n), K - 1):
        bounds = [0, *cuts, n]
        if not all(masks[s][bounds[s], bounds[s + 1] - 1] for s in range(K)):
            continue
        slowest = max(stage_times_for(cost, cuts))
        if slowest < best:
            best, best_cuts = slowest, cuts
    found = solve_partition(cost, K, lambda k: masks[k])
    if not math.isfinite(best):
        assert found is None
        return
    bounds = [0, *found, n]
    assert all(masks[s][bounds[s], bounds[s + 1] - 1] for s in range(K))
    assert max(stage_times_for(cost, found)) == pytest.approx(best), best_cuts


def test_ties_prefer_balanced_other_stages():
    # One heavy node bounds the step; the rest should still be spread evenly, not piled up.
    times = [1.0] * 6 + [10.0]
    cost = segment_costs(times, [], set())
    cuts = solve_partition(cost, 4)
    assert stage_times_for(cost, cuts) == [2.0, 2.0, 2.0, 10.0]


def test_compute_balance_floor_is_the_best_legal_cut_by_compute_alone():
    result = compile_model("models/gpt.py:gpt_mini", CompileConfig(stages=3, microbatches=6))
    order = compute_order(result.gm)
    times, _, forbidden = partition_problem(result.gm, None, order, weight=lambda node: 0.0)
    best = math.inf
    for cuts in itertools.combinations(range(1, len(order)), 2):
        if forbidden.intersection(cuts):
            continue
        bounds = [0, *cuts, len(order)]
        stages = [sum(times[a:b]) for a, b in itertools.pairwise(bounds)]
        best = min(best, max(stages) * 3 / sum(stages))
    floor = best_compute_balance(result.gm, 3)
    assert floor == pytest.approx(best, rel=1e-9)
    # The partition weighs communication too, so its compute can only be as even or less.
    compute = [s["compute_seconds"] for s in result.program["costs"]["stages"]]
    assert 1.0 <= floor <= max(compute) * 3 / sum(compute) + 1e-9
    assert best_compute_balance(result.gm, 1) == pytest.approx(1.0)
    # program.json keeps the floor's stages, and the report states the bound they give.
    floor_seconds = result.program["costs"]["compute_floor_seconds"]
    assert max(floor_seconds) * 3 / sum(floor_seconds) == pytest.approx(floor)
    assert max(floor_seconds) <= max(compute) + 1e-12
    text = render_report(result.program)
    assert f"computes less than {max(floor_seconds) * 1e3:.2f} ms" in text
    assert f"communication left out: imbalance {floor:.3f})" in text


def _after_partitioning(monkeypatch, ref: str, config):
    """The traced graph and context as the partitioner left them (plan_memory may move the cuts later)."""
    from ppcompile import driver

    seen = {}

    def partition_and_keep(gm, ctx):
        seen["gm"], seen["ctx"] = partition_stages(gm, ctx), ctx
        return seen["gm"]

    passes = [(name, partition_and_keep if name == "partition_stages" else p) for name, p in driver.PASSES]
    monkeypatch.setattr(driver, "PASSES", passes)
    driver.compile_model(ref, config)
    return seen["gm"], seen["ctx"]


def _sampled_two_stage_cuts(gm, ctx, order):
    """Eight legal cuts into two stages, drawn with a fixed seed, each assigned in turn: per stage
    (cut, stage, first position, last position, its nodes)."""
    cost = segment_costs(*partition_module.partition_problem(gm, ctx, order))
    legal = [c for c in range(1, len(order)) if math.isfinite(float(cost[0, c - 1] + cost[c, -1]))]
    for cut in random.Random(0).sample(legal, min(8, len(legal))):
        assign_stages(gm, [n.name for n in order], [cut], 2)
        for stage, (start, end) in enumerate([(0, cut - 1), (cut, len(order) - 1)]):
            yield cut, stage, start, end, [n for n in order if n.meta["ppc.stage"] == stage]


@pytest.mark.parametrize(
    "ref",
    [
        "tests/fixtures/unseen_cnn_batchnorm.py:factory",
        "tests/fixtures/unseen_rnn.py:lstm",
        "tests/fixtures/zoo.py:encoder",
        "tests/fixtures/zoo.py:resnet",
    ],
)
def test_fit_check_counts_what_the_memory_plan_counts(monkeypatch, ref):
    """The partitioner's check of which stages fit the budget counted transfer buffers once where the
    memory plan counts one per micro-batch, and no AdamW step on a CPU: cuts it called fitting were
    over budget in plan_memory, which then crashed. Any stage it holds must fit exactly when the
    plan's count does (two stages, so no value is sent to two stages, which a segment cannot see)."""
    gm, ctx = _after_partitioning(monkeypatch, ref, CompileConfig(stages=2, microbatches=4))
    order = compute_order(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for cut, stage, start, end, own in _sampled_two_stage_cuts(gm, ctx, order):
        total = stage_memory(ctx, nodes, own, ctx.live_microbatches[stage], []).total
        assert memory_fits(gm, ctx, order, total + 0.5)(stage)[start, end], (cut, stage)
        assert not memory_fits(gm, ctx, order, total - 0.5)(stage)[start, end], (cut, stage)


def test_parameter_counts_print_with_a_unit():
    # A stage of a few thousand parameters printed as 0.00M.
    from ppcompile.report import format_count

    counts = (0, 170, 2_336, 67_740_000, 1_300_000_000)
    assert [format_count(n) for n in counts] == ["0", "170", "2.34K", "67.74M", "1.30B"]
    result = compile_model("tests/fixtures/unseen_cnn_batchnorm.py:factory", CompileConfig(stages=4))
    rows = [line.split("|") for line in result.files["report.md"].splitlines() if line.startswith("|       ")]
    stages = result.program["costs"]["stages"]
    assert [row[5].strip() for row in rows] == [format_count(s["parameters"]) for s in stages]
    assert all(s["parameters"] > 0 for s in stages) and "0.00M" not in result.files["report.md"]


@pytest.mark.parametrize("ref", ["tests/fixtures/zoo.py:encoder", "models/gpt.py:gpt_mini"])
def test_search_under_recomputation_counts_what_the_plan_counts(monkeypatch, ref):
    """Where no cuts fit as they are, plan_memory searches cuts with every layer recomputed that
    frees memory; its estimate of a stage is the plan's count with those layers recomputed."""
    gm, ctx = _after_partitioning(monkeypatch, ref, CompileConfig(stages=2, microbatches=4))
    order = compute_order(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    memory, _ = recomputed_segment_memory(gm, ctx, order)
    for cut, stage, start, end, own in _sampled_two_stage_cuts(gm, ctx, order):
        live = ctx.live_microbatches[stage]
        planned = stage_memory(ctx, nodes, own, live, candidate_regions(nodes, own, stage))
        assert float(memory.total(live)[start, end]) == pytest.approx(planned.total), (cut, stage)


def test_items_of_a_tuple_follow_it_so_cuts_fall_between_the_towers_that_read_them(tmp_path):
    from ppcompile.check_training import verify_in_process
    from ppcompile.program import write_program
    from ppcompile.runtime.loader import load_program

    result = compile_model("tests/fixtures/split_items.py:model", CompileConfig(stages=4, microbatches=8))
    nodes = list(result.gm.graph.nodes)
    (split,) = [n for n in nodes if n.op == "call_method" and n.target == "split"]
    at = nodes.index(split)
    assert all(n.target is operator.getitem for n in nodes[at + 1 : at + 5])  # the four parts
    towers = {n.meta["ppc.stage"] for n in nodes if n.op == "call_module" and n.target.startswith("towers.")}
    assert len(towers) >= 3
    times = [s["compute_seconds"] for s in result.program["costs"]["stages"]]
    assert max(times) / (sum(times) / 4) < 1.15  # with the split holding the towers together: 2.6
    program = load_program(write_program(tmp_path / "towers", result.program, result.files))
    comparison = verify_in_process(program, steps=2)
    assert comparison.ok, "\n".join(comparison.lines())
