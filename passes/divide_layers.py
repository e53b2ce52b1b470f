"""Divide: linear layers too coarse for even stages become bands of columns a cut may fall between.

No partition is more even than its largest nodes allow: at K=4 each linear layer of gpt_mini's
blocks is a sixth of a mean stage, and the best cut of whole nodes can miss even by several
percent, more where each cut costs its ranks send calls the compute must make room for. This
pass rewrites each linear layer near where even stages would meet (WINDOW_SHARE) and worth at
least two pieces (a piece is PIECE_SHARE of a mean stage's time) as pieces that each compute a
band of its output features, and a ``torch.cat`` of them that keeps the layer's name, so its
users read it unchanged::

    h_3_mlp_c_fc_cols_0_64 = ppcompile.runtime.layers.linear_columns(ln_2, w, b, 0, 64)
    ...
    h_3_mlp_c_fc = torch.cat([h_3_mlp_c_fc_cols_0_64, ..., h_3_mlp_c_fc_cols_192_256], -1)

The partitioner may then cut between two pieces: the stage before computes the first columns and
sends them on with the layer's input; the stage after computes the rest and joins them. Both
ranks hold the weight, as a tied group: each one's gradient is zero outside its own rows, and
their sum is the layer's. ``join_layers`` runs once the cuts are final: a layer no cut divides
becomes the one call it was again, and a divided layer's pieces on each side merge into one.

Matched as ``--fuse-loss`` matches its head: an ``nn.Linear`` module, or ``F.linear`` of a weight (and bias)
read with ``get_attr``. Each piece costs the layer's costs times its share of the columns (its
input is read whole); the cat costs nothing until a cut divides the layer, when the stage that
joins the pieces pays their copy (``DividedLayer.join_cost``, which the partitioner adds there).
With K=1, or ``CompileConfig.divide_layers`` off, the graph is left as it is.

Keys written:
  ppc.piece_of  on a piece: the name of the layer it is part of
  ppc.divided   on the layer's node, now the cat: DividedLayer
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import fx, nn

from ppcompile.context import CompileContext
from ppcompile.passes.estimate_costs import ZERO, NodeCost
from ppcompile.passes.fuse_loss import linear_call
from ppcompile.passes.order_mutations import written_attribute
from ppcompile.passes.partition_stages import compute_order
from ppcompile.runtime.layers import linear_columns

# A piece is at most this share of a mean stage's time: cuts at that grain can even the stages
# to about half of it, well inside the 5% the field asks of a balanced pipeline.
PIECE_SHARE = 0.01
MAX_PIECES = 16
# Only the layers near where even stages would meet are divided: within this share of a mean
# stage of k/K of the whole compute, for each cut k. Communication and memory move the best cuts
# from there by a few percent of a stage; dividing every layer of a 96-layer GPT-3 would double
# the partitioner's nodes for cuts that never fall among most of them.
WINDOW_SHARE = 0.2
# Bands start at multiples of this many columns, and none is narrower: a product whose output
# features fill whole vectors of the widest CPU kernels (16 float32 lanes of AVX-512) and GPU
# tiles gives each column the bits the whole layer's product gives it. A narrower band, or one
# that starts mid-vector, takes another kernel there, a rounding apart, which AdamW's
# normalisation can blow up to the size of a step where a gradient is near zero.
COLUMN_ALIGN = 16


@dataclass(frozen=True)
class DividedLayer:
    """How a divided layer was called, to restore it, and what joining its pieces costs."""

    op: str  # "call_module" or "call_function"
    target: object
    args: tuple
    kwargs: dict
    cost: NodeCost
    cost_poly: dict
    join_cost: NodeCost  # the cat: its output copied forward, the gradient's bands copied back
    pieces: tuple[str, ...]


def divide_layers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if ctx.num_stages == 1 or not ctx.config.divide_layers:
        return gm
    K = ctx.num_stages
    order = compute_order(gm)
    times = [node.meta["ppc.cost"].time for node in order]
    total = sum(times)
    if total <= 0:
        return gm
    piece_time = PIECE_SHARE * total / K
    reach = WINDOW_SHARE * total / K
    meeting = [k * total / K for k in range(1, K)]
    # A weight forward writes (SwAV's renormalised prototypes) stays whole with its writes.
    written = {name for node in gm.graph.nodes if (name := written_attribute(gm, node)) is not None}
    for node, time, before in zip(order, times, itertools.accumulate([0.0, *times])):
        linear = _linear_parts(gm, node)
        if linear is None or not any(before - reach <= m <= before + time + reach for m in meeting):
            continue
        if written & {linear[1], linear[2]}:
            continue
        count = min(MAX_PIECES, math.floor(time / piece_time))
        bounds = column_bounds(node.meta["ppc.concrete"][-1], count)
        if len(bounds) > 2:
            _divide(gm, ctx, node, *linear, bounds)
    gm.recompile()
    return gm


def column_bounds(width: int, count: int) -> list[int]:
    """Where ``count`` bands of ``width`` output features start, and ``width``: each band starts at
    a multiple of COLUMN_ALIGN and is at least that wide, so there are fewer bands where the
    layer is too narrow (one, undivided, below two aligned bands).

    >>> column_bounds(256, 4)
    [0, 64, 128, 192, 256]
    >>> column_bounds(100, 4)
    [0, 32, 48, 80, 100]
    >>> column_bounds(20, 4)
    [0, 20]
    """
    count = min(count, width // COLUMN_ALIGN)
    if count < 2:
        return [0, width]
    last_start = (width - COLUMN_ALIGN) // COLUMN_ALIGN  # in vectors: the last band is a vector or more
    starts = {min(round(i * width / count / COLUMN_ALIGN), last_start) * COLUMN_ALIGN for i in range(count)}
    return sorted(starts | {width})


def _linear_parts(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(input, weight target, bias target or None) of a linear layer this pass may divide."""
    if node.meta.get("ppc.kind") != "tensor" or not node.meta.get("ppc.concrete"):
        return None
    return linear_call(gm, node)


def _divide(gm, ctx, layer: fx.Node, x: fx.Node, weight: str, bias: str | None, bounds: list[int]) -> None:
    graph = gm.graph
    nbytes = layer.meta["ppc.nbytes"]
    copy_time = ctx.profile.compute_time(0.0, 2 * nbytes, layer.meta["ppc.dtype"])
    join_cost = dataclasses.replace(
        ZERO, bytes_moved=2.0 * nbytes, forward_time=copy_time, backward_time=copy_time
    )
    whole = DividedLayer(
        layer.op, layer.target, layer.args, dict(layer.kwargs), layer.meta["ppc.cost"],
        layer.meta["ppc.cost_poly"], join_cost, pieces=(),
    )  # fmt: skip
    pieces = []
    with graph.inserting_before(layer):
        weight_node = graph.get_attr(weight)
        bias_node = graph.get_attr(bias) if bias is not None else None
        for attribute in (weight_node, bias_node):
            if attribute is not None:
                attribute.meta = _attribute_meta(gm, attribute.target, whole)
        for start, stop in zip(bounds, bounds[1:]):
            piece = graph.call_function(
                linear_columns,
                (x, weight_node, bias_node, start, stop),
                name=f"{layer.name}_cols_{start}_{stop}",
            )
            piece.meta = piece_meta(layer, whole, start, stop)
            pieces.append(piece)
    layer.meta["ppc.divided"] = dataclasses.replace(whole, pieces=tuple(p.name for p in pieces))
    layer.op, layer.target = "call_function", torch.cat
    layer.args, layer.kwargs = (pieces, -1), {}
    layer.meta["ppc.cost"] = ZERO
    layer.meta["ppc.cost_poly"] = scaled_poly(whole.cost_poly, 0)
    layer.meta["ppc.view_of"] = None


def _attribute_meta(gm: fx.GraphModule, target: str, whole: DividedLayer) -> dict:
    """A parameter's metadata, as propagate_shapes and estimate_costs give a get_attr node."""
    owner, _, name = target.rpartition(".")
    value = getattr(gm.get_submodule(owner) if owner else gm, name)
    return {
        "ppc.kind": "tensor",
        "ppc.shape": tuple(value.shape),
        "ppc.concrete": tuple(value.shape),
        "ppc.dtype": value.dtype,
        "ppc.requires_grad": value.requires_grad,
        "ppc.nbytes": value.numel() * value.element_size(),
        "ppc.view_of": None,
        "ppc.writes_buffers": False,
        "ppc.cost": ZERO,
        "ppc.cost_poly": scaled_poly(whole.cost_poly, 0),
    }


def piece_meta(layer: fx.Node, whole: DividedLayer, start: int, stop: int) -> dict:
    """The metadata of the band ``start:stop`` of ``layer`` (traced as ``whole``): the layer's, its
    last dim that wide, its costs that share of the layer's (the input is read whole by each band)."""
    meta = {k: v for k, v in layer.meta.items() if k != "ppc.divided"}
    width = layer.meta["ppc.concrete"][-1]
    share = Fraction(stop - start, width)
    cost = whole.cost
    x = whole.args[0] if whole.args else whole.kwargs["input"]
    input_bytes = x.meta.get("ppc.nbytes", 0)
    meta["ppc.cost"] = dataclasses.replace(
        cost,
        forward_flops=cost.forward_flops * share,
        backward_flops=cost.backward_flops * share,
        bytes_moved=input_bytes + (cost.bytes_moved - input_bytes) * share,
        param_bytes=cost.param_bytes * share,
        saved_temp_bytes=cost.saved_temp_bytes * share,
        forward_time=cost.forward_time * share,
        backward_time=cost.backward_time * share,
    )
    meta["ppc.cost_poly"] = scaled_poly(whole.cost_poly, share)
    meta["ppc.shape"] = (*layer.meta["ppc.shape"][:-1], stop - start)
    meta["ppc.concrete"] = (*layer.meta["ppc.concrete"][:-1], stop - start)
    meta["ppc.nbytes"] = layer.meta["ppc.nbytes"] * (stop - start) // width
    meta["ppc.view_of"] = None
    meta["ppc.piece_of"] = layer.name
    if whole.op == "call_module":
        # The pieces run inside the module they divide: layer_of and the report name it.
        path = whole.target
        meta["nn_module_stack"] = {**layer.meta.get("nn_module_stack", {}), path: (path, nn.Linear)}
    return meta


def scaled_poly(poly: dict, share) -> dict:
    """Cost formulas (``ppc.cost_poly``) times ``share``."""
    return {quantity: tuple(c * share for c in coefficients) for quantity, coefficients in poly.items()}


def divided_layers(nodes) -> list[fx.Node]:
    """The cats standing for divided layers among ``nodes``."""
    return [n for n in nodes if "ppc.divided" in n.meta]
