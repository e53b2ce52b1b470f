"""Costs at the micro-batch shape the program is compiled for, from the formulas of fit_cost_formulas.

The graph is traced and costed once, at the example's shape; ``--dims b=8,s=512``, and each
split ``--microbatches auto`` tries, re-costs it here instead of tracing again. Where the trace
decided a condition on shapes (a loop over ``range(x.size(1))``), the model is traced once more
at the new shape to check the condition comes out the same; and the graph runs once on meta
tensors there, to check every value has the shape its formula gives (a slice of a buffer,
``self.pos[:s]``, stops growing at the buffer's length).

Keys rewritten on each node at that shape:
  ppc.cost    FLOPs, bytes moved, saved temporaries and roofline times
  ppc.nbytes  output bytes
``ctx.symbol_values`` becomes that shape.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx

from ppcompile.context import CompileContext
from ppcompile.errors import CompileError
from ppcompile.frontend import check_decided_at, source_line
from ppcompile.passes.fit_cost_formulas import QUANTITIES, evaluate
from ppcompile.passes.propagate_shapes import NodeFailed, run_meta


def cost_at_dims(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    target = ctx.config.dims
    if not target:
        return gm
    unknown = set(target) - set(ctx.symbol_values)
    if unknown:
        raise CompileError(
            f"--dims names {', '.join(sorted(unknown))}, but {ctx.ref}'s symbolic dims are "
            f"{', '.join(sorted(ctx.symbol_values))}"
        )
    point = {**ctx.symbol_values, **target}
    check_decided_at(ctx, target)
    subs = {ctx.symbols[s]: v for s, v in point.items()}
    _check_shapes_at(gm, ctx, point, subs)
    profile = ctx.profile
    for node in gm.graph.nodes:
        if node.meta.get("ppc.kind") == "tensor":
            nbytes = (
                math.prod(int(d.subs(subs)) for d in node.meta["ppc.shape"]) * node.meta["ppc.dtype"].itemsize
            )
            node.meta["ppc.nbytes"] = nbytes
        elif "ppc.nbytes_poly" in node.meta:
            node.meta["ppc.nbytes"] = round(evaluate(node.meta["ppc.nbytes_poly"], ctx.cost_basis, point))
        cost = node.meta["ppc.cost"]
        if cost.forward_time == 0 and cost.backward_time == 0:
            continue
        poly = node.meta["ppc.cost_poly"]
        q = {name: evaluate(poly[name], ctx.cost_basis, point) for name in QUANTITIES}
        dtype = node.meta.get("ppc.dtype", torch.float32)
        node.meta["ppc.cost"] = replace(
            cost,
            forward_flops=q["forward_flops"],
            backward_flops=q["backward_flops"],
            bytes_moved=q["bytes_moved"],
            saved_temp_bytes=q["saved_temp_bytes"],
            forward_time=profile.compute_time(q["forward_flops"], q["bytes_moved"], dtype),
            backward_time=profile.compute_time(
                q["backward_flops"], cost.backward_traffic * q["bytes_moved"], dtype
            )
            if cost.backward_time
            else 0.0,
        )
    ctx.symbol_values = point
    return gm


def _check_shapes_at(gm: fx.GraphModule, ctx: CompileContext, point: dict[str, int], subs: dict) -> None:
    """Refuse a shape the model does not run at, or where a value's shape is not what its formula
    gives: the stages would size and send it by the formula."""
    asked = ",".join(f"{name}={value}" for name, value in ctx.config.dims.items())
    try:
        values = run_meta(gm, ctx, point)
    except NodeFailed as e:
        why = (str(e.error).splitlines() or [""])[0][:200]
        raise CompileError(
            f"--dims {asked}: the model fails at that shape: {source_line(ctx, e.name)}: "
            f"{type(e.error).__name__}: {why}"
        ) from None
    for node in gm.graph.nodes:
        value = values.get(node.name)
        if node.meta.get("ppc.kind") != "tensor" or not isinstance(value, torch.Tensor):
            continue
        formula = node.meta["ppc.shape"]
        if tuple(value.shape) != tuple(int(d.subs(subs)) for d in formula):
            raise CompileError(
                f"--dims {asked}: {source_line(ctx, node.name)} is {list(value.shape)} at that shape, not "
                f"[{', '.join(str(d) for d in formula)}] as at the example's sizes (a slice of a buffer "
                "stops at its length); give an example at that shape, or sizes within what the model holds"
            )
