"""Costs at the micro-batch shape the program is compiled for, from the formulas of fit_cost_formulas.

The graph is traced and costed once, at the example's shape; ``--dims b=8,s=512``, and each
split ``--microbatches auto`` tries, re-costs it here instead of tracing again. Where the trace
decided a condition on shapes (a loop over ``range(x.size(1))``), the model is traced once more
at the new shape to check the condition comes out the same.

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
from ppcompile.frontend import check_decided_at
from ppcompile.passes.fit_cost_formulas import QUANTITIES, evaluate


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
