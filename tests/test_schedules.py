"""Schedule IR, generators, lowering and the simulator; pure Python, no torch.distributed."""

from fractions import Fraction

import pytest

from ppcompile.runtime.actions import Action, ActionKind, format_rank_actions, parse_rank_actions
from ppcompile.schedules import (
    SCHEDULES,
    Schedule,
    ScheduleError,
    format_schedule_grid,
    gpipe,
    linear_edges,
    lower_communication,
    make_schedule,
    one_f_one_b,
)
from ppcompile.simulate import (
    DeadlockError,
    DependencyError,
    StageCosts,
    per_edge_transfer,
    simulate,
)

# Equal stages, backward twice the forward; Fractions keep every simulated time exact.
EQUAL_COSTS = StageCosts(forward=Fraction(1), backward=Fraction(2))


def simulate_chain(schedule: Schedule, **kwargs):
    edges = linear_edges(schedule.num_stages)
    lowered = lower_communication(schedule, edges)
    return simulate(lowered, [EQUAL_COSTS] * schedule.num_stages, edges, **kwargs)


# --- the text form -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ActionKind))
def test_text_form_round_trips_for_every_kind(kind):
    microbatch = None if kind in (ActionKind.REDUCE_GRAD, ActionKind.OPT) else 3
    action = Action(12, kind, microbatch)
    assert Action.parse(str(action)) == action
    assert str(Action.parse(str(action))) == str(action)


def test_text_form_examples():
    assert str(Action(2, ActionKind.F, 0)) == "2F0"
    assert str(Action(1, ActionKind.B, 3)) == "1B3"
    assert str(Action(0, ActionKind.W, 5)) == "0W5"
    assert str(Action(3, ActionKind.SEND_F, 1)) == "3SEND_F1"
    assert str(Action(1, ActionKind.RECV_B, 2)) == "1RECV_B2"
    assert str(Action(0, ActionKind.REDUCE_GRAD, None)) == "0REDUCE_GRAD"
    assert str(Action(0, ActionKind.OPT, None)) == "0OPT"


@pytest.mark.parametrize(
    "text", ["", "F0", "2X0", "2F", "0OPT1", "01F0", "2F00", "-1F0", " 2F0", "2f0", "2F0 1B0"]
)
def test_bad_text_raises_value_error_naming_it(text):
    with pytest.raises(ValueError, match="invalid action") as error:
        Action.parse(text)
    assert repr(text) in str(error.value)
    assert "2F0" in str(error.value)  # the accepted forms are listed


def test_rank_actions_round_trip():
    text = "1RECV_F0 1F0 1SEND_F0 1RECV_B0 1B0 1SEND_B0 1REDUCE_GRAD 1OPT"
    assert format_rank_actions(parse_rank_actions(text)) == text


# --- generators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_stages,microbatches", [(1, 1), (2, 2), (3, 7), (4, 8), (6, 6)])
def test_every_stage_runs_f_and_b_once_per_microbatch_b_after_f(name, num_stages, microbatches):
    schedule = make_schedule(name, num_stages, microbatches)
    assert schedule.num_ranks == schedule.num_stages == num_stages
    for rank, actions in schedule.actions.items():
        assert all(a.is_compute and a.stage == rank for a in actions)
        position = {(a.kind, a.microbatch): i for i, a in enumerate(actions)}
        assert len(position) == len(actions) == 2 * microbatches
        for m in range(microbatches):
            assert position[(ActionKind.F, m)] < position[(ActionKind.B, m)]


def test_gpipe_runs_all_forwards_then_all_backwards_in_order():
    assert format_rank_actions(gpipe(3, 3).actions[1]) == "1F0 1F1 1F2 1B0 1B1 1B2"


def test_one_f_one_b_needs_at_least_as_many_microbatches_as_stages():
    with pytest.raises(ScheduleError, match=r"M=3 .*K=4.*M must be >= K"):
        one_f_one_b(num_stages=4, microbatches=3)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_stages,microbatches", [(0, 4), (4, 0), (-1, 1)])
def test_generators_reject_empty_sizes(name, num_stages, microbatches):
    with pytest.raises(ScheduleError):
        make_schedule(name, num_stages, microbatches)


def test_unknown_schedule_lists_known_ones():
    with pytest.raises(ScheduleError, match="unknown schedule 'zb'.*1f1b, gpipe"):
        make_schedule("zb", 4, 8)


def test_schedule_rejects_action_on_wrong_rank():
    with pytest.raises(ScheduleError, match="stage 1 lives on rank 1"):
        Schedule("bad", 2, 2, 1, {0: (Action(1, ActionKind.F, 0),), 1: ()})


ONE_F_ONE_B_K4_M8 = """\
# 1f1b: 4 stages on 4 ranks, 8 microbatches; compute actions only
step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15
rank 0  0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7
rank 1  1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7
rank 2  2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7
rank 3  3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7
"""


def test_one_f_one_b_grid_is_pipedream_flush():
    # Stage s: K - s - 1 warmup forwards, then F/B pairs, then the remaining backwards.
    assert format_schedule_grid(one_f_one_b(4, 8)) == ONE_F_ONE_B_K4_M8


def test_grid_with_communication_is_deterministic_and_shows_sends():
    lowered = lower_communication(one_f_one_b(4, 8), linear_edges(4))
    grid = format_schedule_grid(lowered, include_communication=True)
    assert grid == format_schedule_grid(lowered, include_communication=True)
    assert "0SEND_F0" in grid and "3RECV_F7" in grid
    # Hiding communication shows the generator's compute grid again.
    assert format_schedule_grid(lowered) == ONE_F_ONE_B_K4_M8


# --- lowering ------------------------------------------------------------------------------------


def test_lowering_adds_sends_and_receives_around_compute():
    lowered = lower_communication(one_f_one_b(2, 2), {(0, 1)})
    assert format_rank_actions(lowered.actions[0]) == "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1"
    assert format_rank_actions(lowered.actions[1]) == "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1"


def test_lowering_without_grad_edges_sends_no_gradients():
    lowered = lower_communication(gpipe(2, 1), {(0, 1)}, grad_edges=set())
    assert format_rank_actions(lowered.actions[0]) == "0F0 0SEND_F0 0B0"
    assert format_rank_actions(lowered.actions[1]) == "1RECV_F0 1F0 1B0"
    simulate(lowered, [EQUAL_COSTS] * 2, {(0, 1)}, grad_edges=set())


def test_lowering_rejects_backward_edges_and_stray_grad_edges():
    with pytest.raises(ScheduleError, match=r"edge \(1, 0\)"):
        lower_communication(gpipe(2, 1), {(1, 0)})
    with pytest.raises(ScheduleError, match="subset"):
        lower_communication(gpipe(3, 1), {(0, 1)}, grad_edges={(1, 2)})


def test_skip_edge_receiver_waits_for_both_peers():
    # Stage 2 reads from stage 1 and, through a skip connection, straight from stage 0.
    edges = {(0, 1), (1, 2), (0, 2)}
    lowered = lower_communication(one_f_one_b(3, 3), edges)
    costs = [EQUAL_COSTS] * 3
    free = simulate(lowered, costs, edges)
    # The slow skip message (sent at t=1) arrives after stage 1's output (sent at t=2).
    slow_skip = simulate(lowered, costs, edges, transfer_time=per_edge_transfer({(0, 2): Fraction(10)}))

    def first(result, text):
        return next(e for e in result.events if str(e.action) == text)

    assert first(free, "2F0").start == 2
    assert first(slow_skip, "2RECV_F0").end == first(slow_skip, "2F0").start == 11
    # Backward: stage 0 needs gradients from both of its consumers.
    slow_grad = simulate(lowered, costs, edges, transfer_time=per_edge_transfer({}, {(0, 2): Fraction(7)}))
    sent_by_stage_2 = first(slow_grad, "2SEND_B0").start
    assert first(slow_grad, "0B0").start == sent_by_stage_2 + 7 > first(slow_grad, "1SEND_B0").start


# --- simulation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_bubble_matches_closed_form_exactly(name):
    for num_stages in range(1, 7):
        for microbatches in range(num_stages, 13):
            result = simulate_chain(make_schedule(name, num_stages, microbatches))
            expected = Fraction(num_stages - 1, microbatches + num_stages - 1)
            assert result.overall_bubble_fraction == expected, (num_stages, microbatches)
            assert result.step_time == (microbatches + num_stages - 1) * 3
            assert result.busy_time == (3 * microbatches,) * num_stages


def test_peak_live_microbatches():
    for num_stages in range(1, 7):
        for microbatches in range(num_stages, 13):
            one_f_one_b_peak = simulate_chain(one_f_one_b(num_stages, microbatches)).peak_live_microbatches
            assert one_f_one_b_peak == tuple(min(num_stages - s, microbatches) for s in range(num_stages))
            gpipe_peak = simulate_chain(gpipe(num_stages, microbatches)).peak_live_microbatches
            assert gpipe_peak == (microbatches,) * num_stages


def test_rank_bubbles_and_events():
    result = simulate_chain(gpipe(2, 2))
    assert result.step_time == 9
    assert result.bubble_fraction == (Fraction(1, 3), Fraction(1, 3))
    assert [str(e.action) for e in result.events if e.rank == 0] == [
        "0F0",
        "0SEND_F0",
        "0F1",
        "0SEND_F1",
        "0RECV_B0",
        "0B0",
        "0RECV_B1",
        "0B1",
    ]


def test_hand_built_deadlock_names_stuck_ranks_actions_and_peers():
    # Both ranks wait to receive before either sends.
    actions = {
        0: tuple(parse_rank_actions("0RECV_B0 0F0 0SEND_F0 0B0")),
        1: tuple(parse_rank_actions("1RECV_F0 1F0 1B0 1SEND_B0")),
    }
    schedule = Schedule("hand", num_ranks=2, num_stages=2, microbatches=1, actions=actions)
    with pytest.raises(DeadlockError) as error:
        simulate(schedule, [EQUAL_COSTS] * 2, {(0, 1)})
    message = str(error.value)
    assert "rank 0 is stuck at 0RECV_B0 waiting for stage 1 (rank 1)" in message
    assert "rank 1 is stuck at 1RECV_F0 waiting for stage 0 (rank 0)" in message


def test_backward_before_forward_is_a_dependency_error():
    actions = {0: tuple(parse_rank_actions("0B0 0F0"))}
    schedule = Schedule("backwards", num_ranks=1, num_stages=1, microbatches=1, actions=actions)
    with pytest.raises(DependencyError, match="0B0 runs before 0F0"):
        simulate(schedule, [EQUAL_COSTS], set())


def test_unlowered_schedule_is_a_dependency_error():
    with pytest.raises(DependencyError, match="0B0 runs before 0RECV_B0"):
        simulate(gpipe(2, 1), [EQUAL_COSTS] * 2, {(0, 1)})


def test_split_backward_uses_its_own_costs():
    actions = {0: tuple(parse_rank_actions("0F0 0I0 0W0"))}
    schedule = Schedule("split", num_ranks=1, num_stages=1, microbatches=1, actions=actions)
    costs = StageCosts(forward=1, backward=3, backward_input=1, backward_weight=2)
    result = simulate(schedule, [costs], set())
    assert result.step_time == 4
    assert result.peak_live_microbatches == (1,)
