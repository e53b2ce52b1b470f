"""Replay a compiled program's schedule in the simulator, from ``program.json`` alone.

``ppcompile simulate DIR`` uses it to predict one step (time, bubble, activations in flight)
and to draw the timeline; benchmarks use it to set predictions beside measurements.
"""

from __future__ import annotations

import math

from ppcompile.devices import get_profile
from ppcompile.runtime.actions import ActionKind, parse_rank_actions
from ppcompile.runtime.executor import dtype_of, evaluate_dim
from ppcompile.schedules import Schedule
from ppcompile.simulate import SimResult, StageCosts, simulate


def program_schedule(program: dict, key: str = "schedule") -> Schedule:
    data = program[key]
    ranks = {int(r): tuple(parse_rank_actions(text)) for r, text in data["ranks"].items()}
    return Schedule(
        name=data["name"],
        num_ranks=len(ranks),
        num_stages=len(program["stages"]),
        microbatches=data["microbatches"],
        actions=ranks,
    )


def boundary_bytes(program: dict, boundary: dict) -> int:
    """One message's bytes at the micro-batch shape the program was costed for."""
    numel = math.prod(evaluate_dim(d, program["symbols"]) for d in boundary["shape"])
    return numel * dtype_of(boundary["dtype"]).itemsize


def simulate_program(program: dict, key: str = "schedule") -> SimResult:
    """One step of the program's schedule with its predicted stage costs and transfer times."""
    schedule = program_schedule(program, key)
    recompute = {}
    for region in program["costs"].get("recomputed", []):
        recompute[region["stage"]] = recompute.get(region["stage"], 0.0) + region["recompute_seconds"]
    costs = {
        s["stage"]: StageCosts(s["forward_seconds"], s["backward_seconds"] + recompute.get(s["stage"], 0.0))
        for s in program["costs"]["stages"]
    }
    profile = get_profile(program["config"]["device_profile"])
    forward, backward = {}, {}
    for b in program["boundaries"]:
        seconds = profile.transfer_time(boundary_bytes(program, b))
        for c in b["consumers"]:
            edge = (b["producer"], c)
            forward[edge] = forward.get(edge, 0.0) + seconds
            if b["requires_grad"]:
                backward[edge] = backward.get(edge, 0.0) + seconds
    edges = set(forward)
    grad_edges = set(backward) if key == "schedule" else set()

    def transfer(producer: int, consumer: int, direction: ActionKind) -> float:
        table = forward if direction == ActionKind.SEND_F else backward
        return table.get((producer, consumer), 0.0)

    return simulate(schedule, costs, edges, grad_edges, transfer_time=transfer)
