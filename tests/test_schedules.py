"""Schedule IR, generators, lowering and the simulator; pure Python, no torch.distributed."""

from fractions import Fraction

import pytest
import sympy

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

F, B, I, W = ActionKind.F, ActionKind.B, ActionKind.I, ActionKind.W  # noqa: E741

# Equal stages, backward twice the forward; Fractions keep every simulated time exact.
EQUAL_COSTS = StageCosts(forward=Fraction(1), backward=Fraction(2))


def simulate_chain(schedule: Schedule, costs: StageCosts = EQUAL_COSTS, **kwargs):
    edges = linear_edges(schedule.num_stages)
    lowered = lower_communication(schedule, edges)
    return simulate(lowered, [costs] * schedule.num_stages, edges, **kwargs)


def valid_sizes(name: str) -> list[tuple[int, int, int]]:
    """(K, M, V) triples each generator accepts, small and awkward ones included."""
    if name == "interleaved-1f1b":
        return [(1, 1, 2), (2, 2, 2), (2, 4, 3), (3, 6, 2), (4, 8, 2), (4, 4, 3), (3, 9, 4)]
    if name == "forward-only":
        return [(1, 1, 1), (2, 1, 1), (3, 7, 1), (4, 8, 2), (3, 4, 2), (2, 5, 3)]
    return [(1, 1, 1), (2, 2, 1), (3, 7, 1), (4, 8, 1), (6, 6, 1)]


ALL_VALID = [(name, *sizes) for name in sorted(SCHEDULES) for sizes in valid_sizes(name)]


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


def test_split_backward_actions_round_trip_through_a_lowered_zb_h1_rank():
    lowered = lower_communication(make_schedule("zb-h1", 3, 3), linear_edges(3))
    for actions in lowered.actions.values():
        text = format_rank_actions(actions)
        assert parse_rank_actions(text) == list(actions)
        assert format_rank_actions(parse_rank_actions(text)) == text
    assert "1I2" in format_rank_actions(lowered.actions[1])
    assert "1W2" in format_rank_actions(lowered.actions[1])


# --- generators: structure -----------------------------------------------------------------------


@pytest.mark.parametrize("name,num_ranks,microbatches,virtual_stages", ALL_VALID)
def test_every_stage_runs_each_pass_once_per_microbatch_in_dependency_order(
    name, num_ranks, microbatches, virtual_stages
):
    schedule = make_schedule(name, num_ranks, microbatches, virtual_stages)
    assert (schedule.num_ranks, schedule.num_stages) == (num_ranks, num_ranks * virtual_stages)
    assert schedule.virtual_stages == virtual_stages
    kinds_by_name = {"forward-only": (F,), "zb-h1": (F, I, W)}
    kinds = kinds_by_name.get(name, (F, B))
    for rank, actions in schedule.actions.items():
        assert all(a.is_compute and schedule.rank_of_stage(a.stage) == rank for a in actions)
        position = {(a.stage, a.kind, a.microbatch): i for i, a in enumerate(actions)}
        stages = schedule.stages_of_rank(rank)
        assert stages == [s for s in range(schedule.num_stages) if s % num_ranks == rank]
        expected = {(s, kind, m) for s in stages for kind in kinds for m in range(microbatches)}
        assert len(actions) == len(position) and set(position) == expected
        for s in stages:
            for m in range(microbatches):
                for before, after in zip(kinds, kinds[1:]):
                    assert position[(s, before, m)] < position[(s, after, m)], (s, m, before, after)
    # The simulator checks every cross-rank dependency and that the lowered schedule cannot deadlock.
    simulate_chain(schedule)


def test_old_positional_call_means_one_stage_per_rank():
    schedule = make_schedule("1f1b", 4, 8)
    assert (schedule.num_ranks, schedule.num_stages, schedule.virtual_stages) == (4, 4, 1)
    assert make_schedule("gpipe", 3, 2) == gpipe(3, 2)


def test_gpipe_runs_all_forwards_then_all_backwards_in_order():
    assert format_rank_actions(gpipe(3, 3).actions[1]) == "1F0 1F1 1F2 1B0 1B1 1B2"


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


# Qi et al. 2024, Figure 3 (ZB-H1): stage s runs 1F1B's K - s - 1 warmup forwards with B split
# into I and W, and delays its W's by s steps, so the last stage runs F I pairs until its first W
# follows I3, and each stage ends with a tail of s deferred W's filling the drain. Identical to
# torch's ScheduleInterleavedZeroBubble (ZB1P) with one stage per rank.
ZB_H1_K4_M8 = """\
# zb-h1: 4 stages on 4 ranks, 8 microbatches; compute actions only
step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23
rank 0  0F0 0F1 0F2 0F3 0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0F6 0I3 0W3 0F7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7
rank 1  1F0 1F1 1F2 1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 1I6 1W5 1I7 1W6 1W7
rank 2  2F0 2F1 2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 2I7 2W5 2W6 2W7
rank 3  3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4 3W5 3W6 3W7
"""


def test_zb_h1_grid_is_the_papers():
    assert format_schedule_grid(make_schedule("zb-h1", 4, 8)) == ZB_H1_K4_M8


# Megatron-LM's interleaved 1F1B, action for action what torch's ScheduleInterleaved1F1B builds
# (checked against torch 2.13's _calculate_single_rank_operations for K <= 5, V <= 4, M in K..3K):
# rounds of K microbatches through chunk 0 (stages 0-3), then chunk 1 (stages 4-7); rank r warms
# up with (V - 1) * K + 2 * (K - r - 1) forwards; backwards visit the last chunk first.
INTERLEAVED_K4_M8_V2 = """\
# interleaved-1f1b: 8 stages on 4 ranks, 8 microbatches; compute actions only
step    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24  25  26  27  28  29  30  31
rank 0  0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 0F4 0F5 0F6 4B0 0F7 4B1 4F4 4B2 4F5 4B3 4F6 0B0 4F7 0B1 0B2 0B3 4B4 4B5 4B6 4B7 0B4 0B5 0B6 0B7
rank 1  1F0 1F1 1F2 1F3 5F0 5F1 5F2 5F3 1F4 5B0 1F5 5B1 1F6 5B2 1F7 5B3 5F4 1B0 5F5 1B1 5F6 1B2 5F7 1B3 5B4 5B5 5B6 5B7 1B4 1B5 1B6 1B7
rank 2  2F0 2F1 2F2 2F3 6F0 6F1 6F2 6B0 6F3 6B1 2F4 6B2 2F5 6B3 2F6 2B0 2F7 2B1 6F4 2B2 6F5 2B3 6F6 6B4 6F7 6B5 6B6 6B7 2B4 2B5 2B6 2B7
rank 3  3F0 3F1 3F2 3F3 7F0 7B0 7F1 7B1 7F2 7B2 7F3 7B3 3F4 3B0 3F5 3B1 3F6 3B2 3F7 3B3 7F4 7B4 7F5 7B5 7F6 7B6 7F7 7B7 3B4 3B5 3B6 3B7
"""


def test_interleaved_grid_is_megatrons():
    assert (
        format_schedule_grid(make_schedule("interleaved-1f1b", 4, 8, virtual_stages=2))
        == INTERLEAVED_K4_M8_V2
    )


def test_forward_only_runs_rounds_of_k_through_each_chunk():
    assert format_rank_actions(make_schedule("forward-only", 3, 2).actions[2]) == "2F0 2F1"
    # A partial last round (microbatch 3 of 4 with K=3) keeps the same order.
    assert (
        format_rank_actions(make_schedule("forward-only", 3, 4, 2).actions[0])
        == "0F0 0F1 0F2 3F0 3F1 3F2 0F3 3F3"
    )


def test_grid_with_communication_is_deterministic_and_shows_sends():
    lowered = lower_communication(one_f_one_b(4, 8), linear_edges(4))
    grid = format_schedule_grid(lowered, include_communication=True)
    assert grid == format_schedule_grid(lowered, include_communication=True)
    assert "0SEND_F0" in grid and "3RECV_F7" in grid
    # Hiding communication shows the generator's compute grid again.
    assert format_schedule_grid(lowered) == ONE_F_ONE_B_K4_M8


# --- generators: bad input -----------------------------------------------------------------------


def schedule_error(name: str, *args) -> str:
    with pytest.raises(ScheduleError) as error:
        make_schedule(name, *args)
    message = str(error.value)
    assert "\n" not in message  # one line for the user
    return message


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize(
    "num_ranks,microbatches,virtual_stages", [(0, 4, 2), (4, 0, 2), (-1, 1, 2), (2, 2, 0)]
)
def test_generators_reject_empty_sizes(name, num_ranks, microbatches, virtual_stages):
    message = schedule_error(name, num_ranks, microbatches, virtual_stages)
    assert f"K={num_ranks}" in message and f"M={microbatches}" in message and f"V={virtual_stages}" in message


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_one_stage_per_rank_schedules_reject_virtual_stages_and_suggest_interleaved(name):
    message = schedule_error(name, 4, 8, 2)
    assert message == (
        f"{name} runs one stage per rank, got V=2 virtual stages; "
        "use V=1, or the interleaved-1f1b schedule for V >= 2"
    )


@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
def test_steady_state_schedules_need_at_least_as_many_microbatches_as_ranks(name):
    message = schedule_error(name, 4, 3)
    assert message == (f"{name} needs at least as many microbatches as ranks: got M=3 for K=4; use M >= 4")


@pytest.mark.parametrize(
    "microbatches,suggestion", [(6, "use M=4 or 8"), (2, "use M=4"), (13, "use M=12 or 16")]
)
def test_interleaved_needs_a_multiple_of_k_microbatches(microbatches, suggestion):
    message = schedule_error("interleaved-1f1b", 4, microbatches, 2)
    assert message == (
        f"interleaved-1f1b needs M to be a multiple of K=4; got M={microbatches}; {suggestion}"
    )


def test_interleaved_needs_two_chunks_and_suggests_1f1b():
    message = schedule_error("interleaved-1f1b", 4, 8)
    assert message == (
        "interleaved-1f1b needs V >= 2 virtual stages per rank, got V=1; "
        "use V=2 or more, or the 1f1b schedule for V=1"
    )


def test_unknown_schedule_lists_known_ones():
    message = schedule_error("zb", 4, 8)
    assert message == (
        "unknown schedule 'zb'; known schedules: 1f1b, forward-only, gpipe, interleaved-1f1b, zb-h1"
    )


def test_schedule_rejects_action_on_wrong_rank():
    with pytest.raises(ScheduleError, match="stage 1 lives on rank 1"):
        Schedule("bad", 2, 2, 1, {0: (Action(1, ActionKind.F, 0),), 1: ()})


# --- lowering ------------------------------------------------------------------------------------


def test_lowering_adds_sends_and_receives_around_compute():
    lowered = lower_communication(one_f_one_b(2, 2), {(0, 1)})
    assert format_rank_actions(lowered.actions[0]) == "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1"
    assert format_rank_actions(lowered.actions[1]) == "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1"


def test_lowering_split_backward_talks_around_i_not_w():
    lowered = lower_communication(make_schedule("zb-h1", 3, 3), linear_edges(3))
    assert format_rank_actions(lowered.actions[1]) == (
        "1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 1RECV_B0 1I0 1SEND_B0 1RECV_F2 1F2 1SEND_F2 "
        "1RECV_B1 1I1 1SEND_B1 1W0 1RECV_B2 1I2 1SEND_B2 1W1 1W2"
    )


def test_lowering_interleaved_wraps_from_the_last_rank_to_the_first():
    lowered = lower_communication(make_schedule("interleaved-1f1b", 2, 2, 2), linear_edges(4))
    # Stage 2 (rank 0's second chunk) reads from stage 1 on rank 1 and sends gradients back to it.
    assert format_rank_actions(lowered.actions[0]) == (
        "0F0 0SEND_F0 0F1 0SEND_F1 2RECV_F0 2F0 2SEND_F0 2RECV_F1 2F1 2SEND_F1 "
        "2RECV_B0 2B0 2SEND_B0 2RECV_B1 2B1 2SEND_B1 0RECV_B0 0B0 0RECV_B1 0B1"
    )


def test_lowering_forward_only_ignores_gradient_edges():
    edges = linear_edges(3)
    lowered = lower_communication(make_schedule("forward-only", 3, 2), edges, grad_edges=edges)
    assert format_rank_actions(lowered.actions[1]) == "1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1"
    result = simulate(lowered, [EQUAL_COSTS] * 3, edges, grad_edges=edges)
    assert result.step_time == 2 + 3 - 1  # M + K - 1 forwards of one time unit each


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


def test_send_call_time_is_charged_to_the_sender():
    edges = {(0, 1)}
    lowered = lower_communication(gpipe(2, 1), edges)
    costs = [StageCosts(1, 2)] * 2
    result = simulate(lowered, costs, edges, transfer_time=lambda *_: 3, send_cost=Fraction(1, 4))

    def event(text):
        return next(e for e in result.events if str(e.action) == text)

    # F0 ends at 1; its send holds rank 0 for 1/4; the message lands at 1 + 3 = 4.
    assert (event("0SEND_F0").start, event("0SEND_F0").end) == (1, Fraction(5, 4))
    assert event("1F0").start == 4
    # The gradient: rank 1's B0 ends at 4 + 1 + 2 = 7; sent by 7.25, it lands at 10.
    assert (event("1SEND_B0").end, event("0B0").start) == (Fraction(29, 4), 10)
    assert result.step_time == 12
    # Busy time is compute only: the call time counts as idle, as in a measured trace.
    assert result.busy_time == (3, 3)


def test_a_waiting_receiver_gets_its_message_at_the_idle_latency():
    # A rank blocked on a receive leaves its core to the threads moving the message: it lands
    # idle_transfer_time after it was sent or the wait began, whichever is later, if that is
    # sooner than transfer_time (the latency between two busy ranks).
    edges = {(0, 1)}
    lowered = lower_communication(gpipe(2, 2), edges)
    costs = [StageCosts(1, 2)] * 2

    def start(result, text):
        return next(e.start for e in result.events if str(e.action) == text)

    busy = simulate(lowered, costs, edges, transfer_time=lambda *_: 3)
    assert (start(busy, "1F0"), start(busy, "1F1")) == (4, 5)
    both = simulate(lowered, costs, edges, transfer_time=lambda *_: 3, idle_transfer_time=lambda *_: 1)
    # 0F0's message leaves at 1 while rank 1 already waits: 1 + 1. 0F1's leaves at 2, but rank 1
    # computes 1F0 until 3 and only then waits: 3 + 1 (sooner than 2 + 3).
    assert (start(both, "1F0"), start(both, "1F1")) == (2, 4)


# --- simulation: closed forms --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_matches_closed_form_exactly(name):
    for num_ranks in range(1, 7):
        for microbatches in range(num_ranks, 13):
            result = simulate_chain(make_schedule(name, num_ranks, microbatches))
            expected = Fraction(num_ranks - 1, microbatches + num_ranks - 1)
            assert result.overall_bubble_fraction == expected, (num_ranks, microbatches)
            assert result.step_time == (microbatches + num_ranks - 1) * 3
            assert result.busy_time == (3 * microbatches,) * num_ranks


def interleaved_bubble_formula():
    """Narayanan et al. 2021, section 2.2.2: each rank idles (K - 1)(t_f + t_b) / V per step and
    computes M (t_f + t_b), so the bubble fraction is (K - 1) / (V M + K - 1) whatever t_f and t_b."""
    K, M, V, t_f, t_b = sympy.symbols("K M V t_f t_b", positive=True)
    idle = (K - 1) * (t_f + t_b) / V
    fraction = idle / (M * (t_f + t_b) + idle)
    assert sympy.simplify(fraction - (K - 1) / (V * M + K - 1)) == 0
    return sympy.Lambda((K, M, V), (K - 1) / (V * M + K - 1))


def test_interleaved_bubble_is_megatrons_formula_exactly():
    formula = interleaved_bubble_formula()
    for num_ranks in range(2, 5):
        for virtual_stages in (2, 3):
            for microbatches in (num_ranks, 2 * num_ranks, 3 * num_ranks):
                schedule = make_schedule("interleaved-1f1b", num_ranks, microbatches, virtual_stages)
                # One chunk holds 1/V of a rank's layers: F = 1/V, B = 2/V.
                chunk = StageCosts(Fraction(1, virtual_stages), Fraction(2, virtual_stages))
                result = simulate_chain(schedule, chunk)
                expected = formula(num_ranks, microbatches, virtual_stages)
                assert result.overall_bubble_fraction == Fraction(str(expected)), (
                    num_ranks,
                    virtual_stages,
                    microbatches,
                )
                assert result.busy_time == (3 * microbatches,) * num_ranks
                assert result.step_time == 3 * microbatches + Fraction(3 * (num_ranks - 1), virtual_stages)


SPLIT_COSTS = StageCosts(
    forward=Fraction(1), backward=Fraction(2), backward_input=Fraction(1), backward_weight=Fraction(1)
)


def test_zb_h1_idles_a_third_of_1f1b_with_equal_f_i_w():
    for num_ranks in range(2, 7):
        for microbatches in range(num_ranks, 3 * num_ranks + 1):
            zb = simulate_chain(make_schedule("zb-h1", num_ranks, microbatches), SPLIT_COSTS)
            baseline = simulate_chain(make_schedule("1f1b", num_ranks, microbatches), SPLIT_COSTS)
            # Qi et al.: 1F1B idles (K - 1)(F + I + W) per rank, ZB-H1 (K - 1)(F + I - W).
            assert [baseline.step_time - busy for busy in baseline.busy_time] == [
                3 * (num_ranks - 1)
            ] * num_ranks
            assert [zb.step_time - busy for busy in zb.busy_time] == [num_ranks - 1] * num_ranks
            assert zb.step_time == 3 * microbatches + num_ranks - 1
            assert zb.overall_bubble_fraction == Fraction(num_ranks - 1, 3 * microbatches + num_ranks - 1)
            assert zb.overall_bubble_fraction <= baseline.overall_bubble_fraction
            # A third of the idle time, but of a shorter step: as a fraction the ratio is
            # (M + K - 1) / (3 M + K - 1), which is below 1/2 and near 1/3 only for M >> K.
            ratio = zb.overall_bubble_fraction / baseline.overall_bubble_fraction
            assert (
                ratio
                == Fraction(microbatches + num_ranks - 1, 3 * microbatches + num_ranks - 1)
                < Fraction(1, 2)
            )


@pytest.mark.parametrize(
    "forward,input_grad,weight_grad",
    [(1, 1, 1), (2, 1, 1), (1, 2, 1), (3, 2, 1), (1, 1, 2), (1, 2, 2), (2, 1, 3)],
)
def test_zb_h1_idle_time_for_unequal_passes(forward, input_grad, weight_grad):
    # The paper's (K - 1)(F + I - W) holds exactly while W <= min(F, I). A longer W no longer fits
    # the gaps it is deferred into; the simulator then finds (K - 1) max(F, I) (derived by
    # simulation over F, I, W in {1, 2, 3, 5}, K in 2..5).
    costs = StageCosts(forward, input_grad + weight_grad, input_grad, weight_grad)
    for num_ranks in range(2, 6):
        result = simulate_chain(make_schedule("zb-h1", num_ranks, 2 * num_ranks), costs)
        idle = {result.step_time - busy for busy in result.busy_time}
        assert idle == {(num_ranks - 1) * max(forward + input_grad - weight_grad, forward, input_grad)}
        if weight_grad <= min(forward, input_grad):
            assert idle == {(num_ranks - 1) * (forward + input_grad - weight_grad)}


# --- simulation: memory --------------------------------------------------------------------------


def test_peak_live_microbatches_of_gpipe_and_1f1b():
    for num_ranks in range(1, 7):
        for microbatches in range(num_ranks, 13):
            one_f_one_b_result = simulate_chain(one_f_one_b(num_ranks, microbatches))
            expected = tuple(num_ranks - s for s in range(num_ranks))
            assert one_f_one_b_result.peak_live_microbatches == expected
            assert one_f_one_b_result.peak_live_per_rank == expected
            gpipe_result = simulate_chain(gpipe(num_ranks, microbatches))
            assert gpipe_result.peak_live_microbatches == (microbatches,) * num_ranks


def test_zb_h1_peaks_at_k_live_microbatches_on_every_stage():
    # A deferred W keeps its microbatch's activations alive. Stage s holds K - s - 1 warmup
    # forwards plus s deferred W's plus the current one: K on every stage, which is 1F1B's peak
    # on stage 0 (the paper: "the peak memory of every worker does not exceed 1F1B's", p M_B),
    # not 1F1B's K - s per stage.
    for num_ranks in range(1, 7):
        for microbatches in range(num_ranks, 3 * num_ranks + 1):
            result = simulate_chain(make_schedule("zb-h1", num_ranks, microbatches), SPLIT_COSTS)
            assert result.peak_live_microbatches == (num_ranks,) * num_ranks


def test_interleaved_peak_memory_per_rank():
    # Rank r holds warmup + 1 chunk activations at its peak, with warmup = (V - 1) K + 2 (K - r - 1),
    # capped at all V M of them. A chunk holds 1/V of the rank's layers, so rank 0 holds
    # ((V - 1) K + 2 K - 1) / V = K (1 + (K - 1) / (V K)) microbatches of a whole rank's
    # activations: the figure Korthikanti et al. 2022 (section 4.2.3) give for Megatron-LM's
    # interleaved schedule, against 1F1B's K.
    for num_ranks in range(2, 5):
        for virtual_stages in (2, 3):
            for microbatches in (num_ranks, 2 * num_ranks, 3 * num_ranks):
                schedule = make_schedule("interleaved-1f1b", num_ranks, microbatches, virtual_stages)
                result = simulate_chain(schedule)
                expected = tuple(
                    min(
                        (virtual_stages - 1) * num_ranks + 2 * (num_ranks - rank - 1) + 1,
                        virtual_stages * microbatches,
                    )
                    for rank in range(num_ranks)
                )
                assert result.peak_live_per_rank == expected
                if microbatches >= 2 * num_ranks:  # the warmup is not capped
                    rank_0_in_whole_ranks = Fraction(result.peak_live_per_rank[0], virtual_stages)
                    assert rank_0_in_whole_ranks == num_ranks * (
                        1 + Fraction(num_ranks - 1, virtual_stages * num_ranks)
                    )


def test_forward_only_keeps_one_microbatch_alive_per_stage():
    result = simulate_chain(make_schedule("forward-only", 3, 5, 2))
    assert result.peak_live_microbatches == (1,) * 6
    assert result.peak_live_per_rank == (1,) * 3


# --- simulation: mechanics -----------------------------------------------------------------------


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


def test_integer_costs_give_exact_fractions():
    edges = linear_edges(2)
    result = simulate(lower_communication(gpipe(2, 2), edges), [StageCosts(1, 2)] * 2, edges)
    assert result.overall_bubble_fraction == Fraction(1, 3)
    assert isinstance(result.overall_bubble_fraction, Fraction)
    assert isinstance(result.bubble_fraction[0], Fraction)


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


def test_interleaved_chunks_in_the_wrong_order_deadlock():
    # Rank 0 insists on stage 2's forward before stage 0's, which stage 2 needs (through rank 1).
    actions = {
        0: tuple(parse_rank_actions("2F0 0F0 2B0 0B0")),
        1: tuple(parse_rank_actions("1F0 3F0 3B0 1B0")),
    }
    schedule = Schedule("wrong-chunks", num_ranks=2, num_stages=4, microbatches=1, actions=actions)
    edges = linear_edges(4)
    with pytest.raises(DeadlockError, match="rank 0 is stuck at 2RECV_F0 waiting for stage 1 \\(rank 1\\)"):
        simulate(lower_communication(schedule, edges), [EQUAL_COSTS] * 4, edges)


def test_backward_before_forward_is_a_dependency_error():
    actions = {0: tuple(parse_rank_actions("0B0 0F0"))}
    schedule = Schedule("backwards", num_ranks=1, num_stages=1, microbatches=1, actions=actions)
    with pytest.raises(DependencyError, match="0B0 runs before 0F0"):
        simulate(schedule, [EQUAL_COSTS], set())


def test_weight_grad_before_input_grad_is_a_dependency_error():
    actions = {0: tuple(parse_rank_actions("0F0 0W0 0I0"))}
    schedule = Schedule("w-first", num_ranks=1, num_stages=1, microbatches=1, actions=actions)
    with pytest.raises(DependencyError, match="0W0 runs before 0I0"):
        simulate(schedule, [SPLIT_COSTS], set())


def test_unlowered_schedule_is_a_dependency_error():
    with pytest.raises(DependencyError, match="0B0 runs before 0RECV_B0"):
        simulate(gpipe(2, 1), [EQUAL_COSTS] * 2, {(0, 1)})


def split_schedule():
    actions = {0: tuple(parse_rank_actions("0F0 0I0 0W0"))}
    return Schedule("split", num_ranks=1, num_stages=1, microbatches=1, actions=actions)


def test_split_backward_uses_its_own_costs():
    costs = StageCosts(forward=1, backward=3, backward_input=1, backward_weight=2)
    result = simulate(split_schedule(), [costs], set())
    assert result.step_time == 4
    assert result.peak_live_microbatches == (1,)


@pytest.mark.parametrize(
    "costs,input_grad,weight_grad",
    [
        (StageCosts(forward=1, backward=3), Fraction(3, 2), Fraction(3, 2)),
        (StageCosts(forward=1, backward=3, backward_input=2), 2, 1),
        (StageCosts(forward=1, backward=3, backward_weight=Fraction(1, 2)), Fraction(5, 2), Fraction(1, 2)),
    ],
)
def test_split_backward_costs_default_to_what_b_leaves(costs, input_grad, weight_grad):
    assert costs.split_backward() == (input_grad, weight_grad)
    result = simulate(split_schedule(), [costs], set())
    durations = {e.action.kind: e.end - e.start for e in result.events}
    assert (durations[I], durations[W]) == (input_grad, weight_grad)
    assert result.step_time == 4
