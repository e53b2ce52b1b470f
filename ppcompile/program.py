"""The program directory: the only thing that couples the compiler to the runtime.

``write_program`` lays out ``program.json``, ``stage_<i>.py``, ``schedule.txt`` and
``report.md`` in a temporary directory beside the target and renames it into place, so an
error never leaves a half-written program. It refuses to replace a directory that is not
a previous program.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import fx

import ppcompile
from ppcompile.codegen import describe_boundary, format_dtype, generate_stage, shape_text, stage_class_name
from ppcompile.context import CompileContext
from ppcompile.errors import CompileError
from ppcompile.passes.plan_memory import activation_bytes
from ppcompile.runtime.actions import format_rank_actions
from ppcompile.runtime.outputs import output_leaves
from ppcompile.schedules import Schedule, format_schedule_grid

FORMAT_VERSION = 1
PROGRAM_FILE = "program.json"


def stage_statistics(gm: fx.GraphModule, ctx: CompileContext) -> list[dict]:
    """Per-stage figures for the report and the runtime: cost, parameters, activations, traffic."""
    nodes = {n.name: n for n in gm.graph.nodes}
    all_params = dict(gm.named_parameters(remove_duplicate=False))
    stats = []
    for sg, seconds in zip(ctx.stage_graphs, ctx.partition.stage_times):
        own = [nodes[name] for name in sg.node_names]
        activation, _ = activation_bytes(nodes, own, [])  # before recomputation, as the report's column says
        param_names = {f"{m}.{n}" for m in sg.modules for n, _ in gm.get_submodule(m).named_parameters()}
        param_names |= {t for t in sg.tensors if t in all_params}
        heaviest = max(own, key=lambda n: n.meta["ppc.cost"].time)
        sent = sum(nodes[s].meta["ppc.nbytes"] * len(ctx.boundaries[s].consumers) for s in sg.sends)
        stats.append(
            {
                "stage": sg.stage,
                "rank": ctx.rank_of(sg.stage),
                "first": (sg.modules or sg.node_names)[0],
                "last": (sg.modules or sg.node_names)[-1],
                "nodes": len(own),
                "parameters": int(sum(all_params[p].numel() for p in param_names)),
                "parameter_names": sorted(param_names),
                "forward_flops": float(sum(n.meta["ppc.cost"].forward_flops for n in own)),
                "backward_flops": float(sum(n.meta["ppc.cost"].backward_flops for n in own)),
                "compute_seconds": float(sum(n.meta["ppc.cost"].time for n in own)),
                "forward_seconds": float(sum(n.meta["ppc.cost"].forward_time for n in own)),
                "backward_seconds": float(sum(n.meta["ppc.cost"].backward_time for n in own)),
                "seconds": float(seconds),
                "activation_bytes": float(activation),
                "sent_bytes": float(sent),
                "formulas": _stage_formulas(ctx, own),
                "heaviest_node": heaviest.name,
                "heaviest_seconds": float(heaviest.meta["ppc.cost"].time),
            }
        )
    return stats


def _stage_formulas(ctx: CompileContext, own) -> dict[str, str]:
    """A stage's FLOPs and saved bytes per micro-batch as polynomials in the symbolic dims."""
    from ppcompile.passes.fit_cost_formulas import formula

    if not ctx.cost_basis:
        return {}
    result = {}
    for quantity in ("forward_flops", "backward_flops", "saved_temp_bytes"):
        total = [sum(c) for c in zip(*(n.meta["ppc.cost_poly"][quantity] for n in own))] if own else []
        result[quantity] = str(formula(tuple(total), ctx.cost_basis, ctx.symbols)) if total else "0"
    return result


def _outputs_json(ctx: CompileContext, gm: fx.GraphModule) -> list[dict]:
    """An inference program's returned values by path: a tensor's shape, dtype and batch dim (the
    first whose size involves ``b``, along which ``run.py --outputs`` joins the micro-batches)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    described = []
    for path, leaf in output_leaves(output.args[0]):
        if isinstance(leaf, fx.Node) and leaf.meta.get("ppc.kind") == "tensor":
            shape = leaf.meta["ppc.shape"]
            batch = next((d for d, e in enumerate(shape) if ctx.symbols.get("b") in e.free_symbols), None)
            described.append(
                {
                    "path": path,
                    "shape": shape_text(shape),
                    "dtype": format_dtype(leaf.meta["ppc.dtype"]),
                    "batch_dim": batch,
                }
            )
        else:
            described.append({"path": path, "batch_dim": None})
    return described


def _schedule_json(schedule: Schedule, virtual_stages: int) -> dict:
    return {
        "name": schedule.name,
        "microbatches": schedule.microbatches,
        "virtual_stages": virtual_stages,
        "ranks": {str(r): format_rank_actions(schedule.actions[r]) for r in sorted(schedule.actions)},
    }


def build_program(
    gm: fx.GraphModule, ctx: CompileContext, schedule: Schedule, inference: Schedule
) -> tuple[dict, dict]:
    """(program.json content without hashes and without the simulated step, {stage and schedule
    files}) for a compiled model; :func:`add_simulation` and ``report.md`` complete it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    version = ppcompile.__version__
    files = {f"stage_{sg.stage}.py": generate_stage(ctx, sg, version) for sg in ctx.stage_graphs}
    files["schedule.txt"] = (
        format_schedule_grid(schedule, include_communication=False)
        + "\n\n# lowered, with communication\n"
        + format_schedule_grid(schedule, include_communication=True)
        + "\n"
    )
    stats = stage_statistics(gm, ctx)
    partition = ctx.partition
    program = {
        "format_version": FORMAT_VERSION,
        "compiler": f"ppcompile {version}",
        "model": {"source": ctx.ref.path, "factory": ctx.ref.factory, "sha256": ctx.ref.sha256()},
        "symbols": {name: ctx.symbol_values[name] for name in sorted(ctx.symbols)},
        # What a batch of other sizes must keep of the conditions on shapes forward decided.
        "decided": [
            {"where": where, "value": value, **kept}
            for (where, value), kept in zip(ctx.decided, ctx.decided_formulas)
            if kept
        ],
        "config": {
            "stages": ctx.config.stages,
            "virtual_stages": ctx.config.virtual_stages,
            "microbatches": ctx.config.microbatches,
            "global_batch": ctx.config.global_batch,
            "schedule": ctx.config.schedule,
            "device_profile": ctx.profile.name,
            "costs_measured_on": ctx.profiled_on,
            "divide_layers": ctx.config.divide_layers,
        },
        "inputs": [
            {
                "name": name,
                "shape": shape_text(nodes[name].meta["ppc.shape"]),
                "dtype": format_dtype(nodes[name].meta["ppc.dtype"]),
                "consumers": [sg.stage for sg in ctx.stage_graphs if name in sg.graph_inputs],
            }
            for name in ctx.input_names
        ],
        "stages": [
            {
                "id": sg.stage,
                "rank": ctx.rank_of(sg.stage),
                "file": f"stage_{sg.stage}.py",
                "class": stage_class_name(sg.stage),
                "inputs": sg.graph_inputs,
                "receives": sg.receives,
                # Ints from shapes that an earlier stage made and this one takes after its receives,
                # computed from the micro-batch's sizes (runtime.executor.size_value), never sent.
                "sizes": [
                    {
                        "name": name,
                        "kind": nodes[name].meta["ppc.value"].kind,
                        "value": nodes[name].meta["ppc.value"].json(),
                    }
                    for name in sg.sizes
                ],
                "sends": sg.sends,
                "returns_loss": sg.returns_loss,
                "returns_output": sg.returns_output,
                "parameters": stat["parameter_names"],
            }
            for sg, stat in zip(ctx.stage_graphs, stats)
        ],
        "boundaries": [
            {
                "name": b.name,
                "shape": shape_text(b.shape),
                "dtype": format_dtype(b.dtype),
                "requires_grad": b.requires_grad,
                "producer": b.producer,
                "consumers": list(b.consumers),
                "text": describe_boundary(b),
                # Present where its memory is not in its dims' order: the order the wire keeps.
                **({"dim_order": list(b.dim_order)} if b.dim_order else {}),
            }
            for b in ctx.boundaries.values()
        ],
        "tied_parameters": ctx.tied_groups,
        # False for an inference program (--schedule forward-only): it returns forward's outputs.
        "trains": ctx.config.trains,
        **({} if ctx.config.trains else {"outputs": _outputs_json(ctx, gm)}),
        # Linear layers computed together with their cross-entropy (--fuse-loss): losses then
        # match eager to float rounding, not bitwise.
        "fused_losses": list(ctx.fused_losses),
        # Linear layers a cut divides (passes/divide_layers.py): each stage's band of output features.
        "divided_layers": list(ctx.divided),
        "schedule": _schedule_json(schedule, ctx.config.virtual_stages),
        "inference_schedule": _schedule_json(inference, ctx.config.virtual_stages),
        "costs": {
            "stages": [{k: v for k, v in s.items() if k != "parameter_names"} for s in stats],
            "even_split_seconds": partition.even_split_times,
            "even_split_layers": partition.even_split_layers,
            "compute_floor_seconds": partition.compute_floor_times,
            "total_compute_seconds": float(sum(n.meta["ppc.cost"].time for n in gm.graph.nodes)),
            "memory": [m.as_dict() for m in ctx.memory],
            "memory_per_device": ctx.config.memory_per_device,
            "optimizer": ctx.config.optimizer,
            "notes": list(ctx.notes),  # what the passes found that the report should say
            # One message arrives latency + bytes / bandwidth after it is sent and costs the two
            # ranks their own call times: the device profile's figures, or the ones measured
            # between busy ranks (--profile on a CPU).
            "link": {
                "latency_seconds": ctx.profile.link_latency,
                "bandwidth_bytes_per_second": ctx.profile.link_bandwidth,
                "send_seconds": ctx.profile.send_overhead,
                "idle_latency_seconds": ctx.profile.idle_latency,
            },
            "recomputed": [
                {
                    "region": r.name,
                    "stage": r.stage,
                    "saved_bytes": r.saved_bytes,
                    "recompute_seconds": r.recompute_seconds,
                }
                for r in ctx.regions
            ],
        },
    }
    return program, files


def add_simulation(program: dict, simulated) -> None:
    """Record one simulated step of the program's schedule in its costs."""
    program["costs"]["simulated_step_seconds"] = float(simulated.step_time)
    program["costs"]["simulated_bubble"] = float(simulated.overall_bubble_fraction)
    # Micro-batches whose activations a stage holds at once under this schedule.
    program["costs"]["simulated_live_microbatches"] = [int(n) for n in simulated.peak_live_microbatches]


def write_program(out_dir: str | Path, program: dict, files: dict[str, str]) -> Path:
    """Write atomically into ``out_dir``; replace it only if it holds a previous program."""
    out = Path(out_dir)
    if out.exists() and not is_program_dir(out):
        if not out.is_dir() or any(out.iterdir()):
            raise CompileError(
                f"output directory {out} exists and is not a ppcompile program; choose a new -o or remove it"
            )
    program = dict(program)
    source = Path(program["model"]["source"]).resolve()
    program["model"] = {**program["model"], "source_from_program": os.path.relpath(source, out.resolve())}
    program["files"] = {
        name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in files.items():
            (staging / name).write_text(text)
        (staging / "run.py").write_text(RUN_PY)
        program["files"]["run.py"] = hashlib.sha256(RUN_PY.encode()).hexdigest()
        (staging / PROGRAM_FILE).write_text(json.dumps(program, indent=2, sort_keys=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a
    half-written one (a compile killed mid-write, two compiles sharing a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def is_program_dir(path: Path) -> bool:
    try:
        return "format_version" in json.loads((path / PROGRAM_FILE).read_text())
    except (OSError, ValueError):
        return False


def read_program(path: str | Path) -> dict:
    path = Path(path)
    if not is_program_dir(path):
        raise CompileError(
            f"{path} is not a ppcompile program (no readable {PROGRAM_FILE}); run ppcompile compile first"
        )
    return json.loads((path / PROGRAM_FILE).read_text())


RUN_PY = '''"""Run this program: torchrun --nproc-per-node K run.py --steps N"""

import sys
from pathlib import Path

from ppcompile.runtime.main import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().parent, sys.argv[1:]))
'''
