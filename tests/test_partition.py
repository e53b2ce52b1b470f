"""The partitioner is optimal for its cost model: checked against brute force on small problems."""

import itertools
import math
import random

import pytest

from ppcompile.passes.partition_stages import CrossingValue, segment_costs, solve_partition, stage_times_for


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


def test_ties_prefer_balanced_other_stages():
    # One heavy node bounds the step; the rest should still be spread evenly, not piled up.
    times = [1.0] * 6 + [10.0]
    cost = segment_costs(times, [], set())
    cuts = solve_partition(cost, 4)
    assert stage_times_for(cost, cuts) == [2.0, 2.0, 2.0, 10.0]
