"""The partition report, rendered from ``program.json`` alone so that ``report.md`` and
``ppcompile report`` always agree."""

from __future__ import annotations

from tabulate import tabulate

from ppcompile.memory import format_bytes

MB = 1e6


def format_count(n: float) -> str:
    """A parameter count with a unit that keeps it readable: 950, 12.29K, 67.74M, 1.30B; a nonzero
    count never prints as zero."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def render_report(program: dict) -> str:
    costs = program["costs"]
    stages = costs["stages"]
    K = len(stages)
    M = program["config"]["microbatches"]
    rows = [
        [
            s["stage"],
            s["rank"],
            f"{s['first']} .. {s['last']}",
            s["nodes"],
            format_count(s["parameters"]),
            f"{s['forward_flops'] / 1e9:.2f}",
            f"{s['backward_flops'] / 1e9:.2f}",
            f"{s['seconds'] * 1e3:.2f}",
            f"{s['activation_bytes'] / MB:.2f}",
            f"{s['sent_bytes'] / MB:.2f}",
        ]
        for s in stages
    ]
    headers = [
        "stage",
        "rank",
        "FQN range",
        "nodes",
        "params",
        "fwd GFLOP",
        "bwd GFLOP",
        "time ms",
        "act MB/mb",
        "sent MB/mb",
    ]
    times = [s["seconds"] for s in stages]
    mean = sum(times) / K
    slowest = max(range(K), key=times.__getitem__)
    imbalance = max(times) / mean
    heaviest = stages[slowest]
    share = heaviest["heaviest_seconds"] / times[slowest]
    floor = costs.get("compute_floor_seconds")
    trains = program.get("trains", True)
    divides = program["config"].get("divide_layers", False)
    if floor:
        bound = (
            f"no partition's slowest stage computes less than {max(floor) * 1e3:.2f} ms (the best cut by "
            f"{'forward + backward' if trains else 'forward'} alone, communication left out: imbalance "
            f"{max(floor) * K / sum(floor):.3f})"
        )
    else:  # a program.json from before the floor was kept: the mean stage or the heaviest node
        heaviest_node = max(s["heaviest_seconds"] for s in stages)
        lower_bound = max(sum(s["compute_seconds"] for s in stages) / K, heaviest_node)
        bound = f"no partition beats {lower_bound * 1e3:.2f} ms per stage"
    bubble = (K - 1) / (M + K - 1)
    model = program["model"]
    lines = [
        f"# ppcompile partition report: {model['source']}:{model['factory']}",
        "",
        f"{K} stages, {M} micro-batches, schedule {program['schedule']['name']}"
        + ("" if trains else " (inference: forward only, without autograd)")
        + ", "
        + (
            f"costs measured on {program['config']['costs_measured_on']} (--profile)"
            if program["config"].get("costs_measured_on")
            else f"device profile {program['config']['device_profile']}"
        )
        + "; costs per micro-batch at "
        + ", ".join(f"{k}={v}" for k, v in program["symbols"].items())
        + ".",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        f"- imbalance (slowest / mean stage time): {imbalance:.3f}",
    ]
    even = costs.get("even_split_seconds")
    if even:
        even_imbalance = max(even) / (sum(even) / K)
        lines.append(
            f"- even split by layer count ({costs['even_split_layers']} layers dealt out evenly): imbalance "
            f"{even_imbalance:.3f}, slowest stage {max(even) * 1e3:.2f} ms vs {max(times) * 1e3:.2f} ms here"
        )
    elif costs.get("even_split_layers"):
        lines.append(
            f"- even split by layer count ({costs['even_split_layers']} layers dealt out evenly): not possible, "
            "one of its cuts would cross what must stay on one stage"
        )
    else:
        lines.append("- even split by layer count: not applicable (no repeated layers to deal out)")
    lines += [f"- {note}" for note in costs.get("notes", [])]
    for divided in program.get("divided_layers", []):
        bands = ", ".join(f"{start}-{stop} on stage {stage}" for stage, start, stop in divided["columns"])
        lines.append(
            f"- `{divided['layer']}` divided by output features across a cut: columns {bands}; its weight "
            "is held by each of those ranks (a tied group)"
        )
    lines += [
        f"- slowest stage: {slowest}; its heaviest node `{heaviest['heaviest_node']}` is {share:.0%} of it "
        f"({heaviest['heaviest_seconds'] * 1e3:.2f} of {times[slowest] * 1e3:.2f} ms); "
        + ("no node but a linear layer is divided" if divides else "a node is never split")
        + f", so {bound}",
        f"- predicted bubble (K-1)/(M+K-1): {bubble:.3f}",
        f"- simulated step ({program['schedule']['name']}, transfers included"
        f"{', stages timed whole' if 'calibrated' in costs else ''}"
        f"{', optimizer update included' if 'calibrated' in costs and trains else ''}): "
        f"{costs['simulated_step_seconds'] * 1e3:.1f} ms, bubble {costs['simulated_bubble']:.3f}",
    ]
    formulas = [s.get("formulas") for s in stages]
    if any(formulas):
        lines += ["", "Forward FLOPs per micro-batch as a formula of the symbolic dims:", ""]
        lines += [
            f"- stage {s['stage']}: {s['formulas']['forward_flops']}" for s in stages if s.get("formulas")
        ]
    lines += _memory_section(program)
    lines += _auto_section(program)
    lines += _microbatch_section(program)
    for group in program["tied_parameters"]:
        lines.append(
            f"- tied parameters {', '.join(group['parameters'])} on stages "
            f"{', '.join(map(str, group['stages']))}: "
            + ("gradients summed across them" if trains else "each holds a copy")
        )
    if not trains:
        returned = "; ".join(
            f"{o['path']} {'[' + ', '.join(o['shape']) + '] ' + o['dtype'] if 'shape' in o else '(not a tensor)'}"
            for o in program.get("outputs", [])
        )
        lines.append(f"- stage {K - 1} returns what forward returns: {returned}")
    return "\n".join(lines) + "\n"


def _memory_section(program: dict) -> list[str]:
    costs = program["costs"]
    memory = costs.get("memory") or []
    if not memory:
        return []
    budget = costs.get("memory_per_device")
    rows = []
    for stage, m in enumerate(memory):
        static = m["parameters"] + m["gradients"] + m["optimizer"] + m["buffers"]
        rows.append(
            [
                stage,
                format_bytes(static),
                f"{format_bytes(m['activations_per_microbatch'])} x {m['live_microbatches']}",
                format_bytes(m["transfers"]),
                format_bytes(m["recompute"]),
                format_bytes(m.get("working", 0)),
                format_bytes(m["total"]),
            ]
        )
    trains = program.get("trains", True)
    headers = [
        "rank",
        "params+grads+optimizer" if trains else "params+buffers",
        "activations x in flight",
        "transfers",
        "recompute",
        "working",
        "peak",
    ]
    limit = f"budget {format_bytes(budget)} per rank" if budget else "no budget given (--memory-per-device)"
    lines = [
        "",
        f"Predicted peak memory per rank ({costs.get('optimizer', 'adamw')} state; {limit}):"
        if trains
        else f"Predicted peak memory per rank (inference: no gradients, optimizer state or saved activations; {limit}):",
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
    ]
    if any("working" in m for m in memory):
        lines.append(
            "- working: the tensors of the operation running at the peak beside what is saved: its result "
            "and input, or their gradients, or the scratch of an operation that keeps a temporary"
        )
    for stage, m in enumerate(memory):
        held = m["activations_per_microbatch"] * m["live_microbatches"] + m["recompute"] + m.get("working", 0)
        if m.get("update", 0) > held:
            lines.append(
                f"- rank {stage} peaks in the optimizer step, whose temporaries ({format_bytes(m['update'])}) "
                "outweigh its activations"
            )
    recomputed = costs.get("recomputed") or []
    if recomputed:
        by_stage: dict[int, list[str]] = {}
        for r in recomputed:
            by_stage.setdefault(r["stage"], []).append(r["region"])
        for stage, regions in sorted(by_stage.items()):
            extra = sum(r["recompute_seconds"] for r in recomputed if r["stage"] == stage)
            # Each region's figure is what it freed beside those chosen before it: they add up to the drop.
            freed = sum(r["saved_bytes"] for r in recomputed if r["stage"] == stage)
            lines.append(
                f"- recomputed in backward on stage {stage}: {', '.join(regions)} "
                f"(frees {format_bytes(freed)} per micro-batch, costs {extra * 1e3:.2f} ms per micro-batch)"
            )
    elif trains:
        lines.append("- nothing is recomputed in backward")
    return lines


def _auto_section(program: dict) -> list[str]:
    tried = program["costs"].get("auto")
    if not tried:
        return []
    chosen = program["schedule"]["name"], program["schedule"]["virtual_stages"]
    rows = []
    for t in tried:
        mark = "<- chosen" if (t["schedule"], t["virtual_stages"]) == chosen else ""
        if "rejected" in t:
            rows.append([t["schedule"], t["virtual_stages"], "", "", "", f"rejected: {t['rejected'][:90]}"])
        else:
            rows.append(
                [
                    t["schedule"],
                    t["virtual_stages"],
                    *_predicted_cells(t),
                    mark or (f"{t['recomputed']} layers recomputed" if t["recomputed"] else ""),
                ]
            )
    best = min((t for t in tried if "rejected" not in t), key=lambda t: t["step_seconds"])
    return [
        "",
        f"--schedule auto chose {best['schedule']} (V={best['virtual_stages']}): the shortest simulated step "
        "among the schedules that fit the memory budget.",
        "",
        tabulate(rows, headers=["schedule", "V", "step ms", "bubble", "peak memory", ""], tablefmt="github"),
    ]


def _predicted_cells(tried: dict) -> list[str]:
    """What an auto choice's candidate was predicted to take: step ms, bubble, peak memory."""
    return [f"{tried['step_seconds'] * 1e3:.1f}", f"{tried['bubble']:.3f}", format_bytes(tried["peak_bytes"])]


def _microbatch_section(program: dict) -> list[str]:
    """``--microbatches auto``'s table: each split of the global batch it compiled."""
    tried = program["costs"].get("microbatch_choice")
    if not tried:
        return []
    chosen = program["schedule"]["microbatches"]
    rows = []
    for t in tried:
        if "rejected" in t:
            rows.append([t["microbatches"], "", "", "", "", "", f"rejected: {t['rejected'][:90]}"])
            continue
        schedule = t["schedule"] + (f" V={t['virtual_stages']}" if t["virtual_stages"] > 1 else "")
        note = "<- chosen" if t["microbatches"] == chosen else ""
        if t["recomputed"]:
            note = "; ".join(filter(None, [note, f"{t['recomputed']} layers recomputed"]))
        rows.append(
            [
                t["microbatches"],
                t["micro_batch_rows"],
                schedule,
                *_predicted_cells(t),
                note,
            ]
        )
    return [
        "",
        f"--microbatches auto split the global batch of {program['config']['global_batch']} rows into {chosen} "
        "micro-batches: the shortest simulated step among the splits that fit the memory budget.",
        "",
        tabulate(
            rows,
            headers=["M", "rows (b)", "schedule", "step ms", "bubble", "peak memory", ""],
            tablefmt="github",
            disable_numparse=True,
        ),
    ]
