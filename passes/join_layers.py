"""Join: once the cuts are final, each layer ``divide_layers`` cut into pieces becomes as few calls
as the cuts allow.

A layer whose pieces all sit on one stage is the call it was before (its node, name and costs),
so a partition that divides nothing compiles to the code it would have without division. A
layer a cut divides keeps one piece per stage, each the band of columns that stage computes,
and the cat that joins them, which now costs its copy; recomputed regions and the compute
order are renamed to match.

Writes ``ctx.divided``: per divided layer, its name and each stage's band of columns.

Keys written:
  ppc.joins  on a divided layer's node (the cat): the names of the bands it joins
"""

from __future__ import annotations

import dataclasses
import itertools

from torch import fx

from ppcompile.context import CompileContext
from ppcompile.passes.divide_layers import divided_layers, piece_meta, scaled_poly
from ppcompile.passes.partition_stages import compute_order
from ppcompile.runtime.layers import linear_columns


def join_layers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    ctx.divided = []
    nodes = {n.name: n for n in gm.graph.nodes}
    renamed: dict[str, str] = {}
    for layer in divided_layers(gm.graph.nodes):
        divided = layer.meta["ppc.divided"]
        pieces = [nodes[name] for name in divided.pieces]
        runs = [list(run) for _, run in itertools.groupby(pieces, key=lambda p: p.meta["ppc.stage"])]
        if len(runs) == 1 and layer.meta["ppc.stage"] == runs[0][0].meta["ppc.stage"]:
            _restore(gm, layer, divided, pieces)
            renamed |= {p.name: layer.name for p in pieces}
            continue
        joined = [_merge(gm, layer, divided, run) for run in runs]
        renamed |= {p.name: j.name for run, j in zip(runs, joined) for p in run}
        layer.args = (joined, -1)
        del layer.meta["ppc.divided"]
        layer.meta["ppc.joins"] = tuple(j.name for j in joined)
        layer.meta["ppc.cost"] = divided.join_cost
        layer.meta["ppc.cost_poly"] = scaled_poly(divided.cost_poly, 0)
        ctx.divided.append(
            {
                "layer": layer.name,
                "columns": [[j.meta["ppc.stage"], j.args[3], j.args[4]] for j in joined],
            }
        )
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    _renumber(gm, ctx, renamed)
    return gm


def _restore(gm: fx.GraphModule, layer: fx.Node, divided, pieces: list[fx.Node]) -> None:
    """The layer's node as traced: its call, its costs, the stage and region its pieces had."""
    layer.op, layer.target = divided.op, divided.target
    layer.args, layer.kwargs = divided.args, divided.kwargs
    layer.meta["ppc.cost"], layer.meta["ppc.cost_poly"] = divided.cost, divided.cost_poly
    del layer.meta["ppc.divided"]
    layer.meta["ppc.checkpoint"] = pieces[0].meta.get("ppc.checkpoint")
    for piece in pieces:
        gm.graph.erase_node(piece)


def _merge(gm: fx.GraphModule, layer: fx.Node, whole, run: list[fx.Node]) -> fx.Node:
    """One piece computing the columns of the pieces in ``run`` (consecutive, on one stage)."""
    if len(run) == 1:
        return run[0]
    first, last = run[0], run[-1]
    x, weight, bias, start, _ = first.args
    stop = last.args[4]
    with gm.graph.inserting_before(first):
        merged = gm.graph.call_function(
            linear_columns, (x, weight, bias, start, stop), name=f"{layer.name}_cols_{start}_{stop}"
        )
    merged.meta = piece_meta(layer, whole, start, stop)
    for key in ("ppc.stage", "ppc.position", "ppc.checkpoint"):
        merged.meta[key] = first.meta.get(key)
    for piece in run:
        piece.replace_all_uses_with(merged)
        gm.graph.erase_node(piece)
    return merged


def _renumber(gm: fx.GraphModule, ctx: CompileContext, renamed: dict[str, str]) -> None:
    """The compute order, cut positions and recomputed regions of the joined graph."""
    order = compute_order(gm)
    partition = ctx.partition
    partition.compute_order = [n.name for n in order]
    for i, node in enumerate(order):
        node.meta["ppc.position"] = i
    stages = [n.meta["ppc.stage"] for n in order]
    partition.cut_positions = [i for i in range(1, len(order)) if stages[i] != stages[i - 1]]
    partition.fitting_cuts = partition.fitting_times = None  # positions in the order before joining
    ctx.regions = [
        dataclasses.replace(r, nodes=tuple(dict.fromkeys(renamed.get(n, n) for n in r.nodes)))
        for r in ctx.regions
    ]
