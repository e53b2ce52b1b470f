"""Symbolic costs: every node's FLOPs, bytes and saved temporaries as polynomials in b, s, ...

Costs are measured (on the meta device, nothing allocated) at a small grid of micro-batch
shapes around the example and fitted exactly: degree 1 in the batch dim ``b`` (costs are linear
in the rows) and degree 2 in one other dim such as ``s`` (attention is quadratic in sequence
length); with several other dims, degree 1 in each. Six meta runs suffice for a GPT.

The report prints each stage's cost as a formula, and the next pass (cost_at_dims) costs the
graph at another micro-batch shape (``--dims b=8,s=512``, each split of ``--microbatches auto``)
from these formulas, without tracing again.

Keys written on each node:
  ppc.cost_poly    {quantity: coefficients} over ctx.cost_basis (exact fractions)
  ppc.nbytes_poly  coefficients of a tuple output's bytes (nn.LSTM's (output, (h, c))), whose
                   size no single symbolic shape gives
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import sympy
import torch
from torch import fx

from ppcompile.context import CompileContext
from ppcompile.errors import CompileError
from ppcompile.frontend import DECIDED_NOTE
from ppcompile.passes.estimate_costs import (
    _arg_nodes,
    _measure,
    _signature,
    _takes_from_view_tuple,
    costs_nothing,
)
from ppcompile.passes.propagate_shapes import run_fake_cpu, run_meta, sample_values, tuple_nbytes

QUANTITIES = ("forward_flops", "backward_flops", "bytes_moved", "saved_temp_bytes")


def fit_cost_formulas(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    basis, grids = _designs(ctx)
    ctx.cost_basis = basis
    if len(grids[0]) == 1:
        for node in gm.graph.nodes:
            cost = node.meta["ppc.cost"]
            node.meta["ppc.cost_poly"] = {q: (Fraction(getattr(cost, q)),) for q in QUANTITIES}
        return gm
    failures = []
    for points in grids:
        try:
            samples, tuple_samples = _sample(gm, ctx, points)
            break
        except Exception as e:  # a size the model refuses (a mask capped at block_size): next grid
            failures.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    else:
        sizes = {name: sorted({p[name] for grid in grids for p in grid}) for name in ctx.symbol_values}
        # A loop or branch decided for the example's shapes may be why: the graph holds there only.
        decided = next((n for n in ctx.notes if n.startswith(DECIDED_NOTE)), None)
        raise CompileError(
            f"{ctx.ref}: costing the model at other micro-batch shapes failed at every size tried "
            f"({'; '.join(f'{n} in {v}' for n, v in sizes.items())}); last: {failures[-1].rstrip('.')}"
            + (
                f"; the graph was traced with {decided}, which may not hold at other sizes: leave the dims "
                "it depends on out of ModelSpec.dims"
                if decided
                else ""
            )
        )
    tuples = [node for node in gm.graph.nodes if node.meta.get("ppc.kind") == "tuple"]
    inverse = _inverse([[_monomial(m, p) for m in basis] for p in points])
    for node in gm.graph.nodes:
        rows = samples[node.name]
        poly = {}
        for q in range(len(QUANTITIES)):
            ys = [Fraction(round(r[q])) for r in rows]
            poly[QUANTITIES[q]] = tuple(
                sum(inverse[t][p] * ys[p] for p in range(len(points))) for t in range(len(basis))
            )
        node.meta["ppc.cost_poly"] = poly
    for node in tuples:
        ys = [Fraction(n) for n in tuple_samples[node.name]]
        node.meta["ppc.nbytes_poly"] = tuple(
            sum(inverse[t][p] * ys[p] for p in range(len(points))) for t in range(len(basis))
        )
    return gm


def _sample(gm: fx.GraphModule, ctx: CompileContext, points: list[dict[str, int]]):
    """Every node's quantities, and every tuple output's bytes, at each of ``points``."""
    samples = {node.name: [] for node in gm.graph.nodes}
    tuples = [node for node in gm.graph.nodes if node.meta.get("ppc.kind") == "tuple"]
    tuple_samples = {node.name: [] for node in tuples}
    cache: dict = {}
    device_specific = any(node.meta.get("ppc.device_specific") for node in gm.graph.nodes)
    for point in points:
        if point == ctx.symbol_values:
            for node in gm.graph.nodes:
                cost = node.meta["ppc.cost"]
                samples[node.name].append([getattr(cost, q) for q in QUANTITIES])
            for node in tuples:
                tuple_samples[node.name].append(node.meta["ppc.nbytes"])
            continue
        values = run_meta(gm, ctx, point)
        # A run on fake CPU tensors costs twice a meta run: only where some node needs it.
        device_values = run_fake_cpu(gm, ctx, point) if device_specific else values
        for node in gm.graph.nodes:
            samples[node.name].append(_quantities_at(gm, node, values, device_values, cache, ctx))
        for node in tuples:
            tuple_samples[node.name].append(tuple_nbytes(values[node.name]))
    return samples, tuple_samples


def _designs(ctx: CompileContext):
    """Monomials (exponent dicts), and grids of points that determine them exactly, best first:
    each symbol's sizes from ``sample_values``, the k-th grid taking every symbol's k-th list."""
    others = [s for s in sorted(ctx.symbol_values) if s != "b"]
    degree = 2 if len(others) == 1 else 1
    names = sorted(ctx.symbol_values)
    tops = [1 if name == "b" else degree for name in names]
    basis = [dict(zip(names, e)) for e in itertools.product(*(range(top + 1) for top in tops))]
    options = [sample_values(name, ctx.symbol_values[name], top + 1) for name, top in zip(names, tops)]
    grids = []
    for k in range(max(map(len, options), default=1)):
        axes = [o[min(k, len(o) - 1)] for o in options]
        points = [dict(zip(names, combo)) for combo in itertools.product(*axes)]
        points.sort(key=lambda p: p != ctx.symbol_values)  # the example first
        if points not in grids:
            grids.append(points)
    return basis, grids


def _monomial(exponents: dict[str, int], point: dict[str, int]) -> Fraction:
    return Fraction(math.prod(point[s] ** e for s, e in exponents.items()))


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact inverse by Gauss-Jordan over fractions (the design matrix is small)."""
    n = len(matrix)
    a = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if a[r][col] != 0)
        a[col], a[pivot] = a[pivot], a[col]
        scale = a[col][col]
        a[col] = [x / scale for x in a[col]]
        for r in range(n):
            if r != col and a[r][col] != 0:
                factor = a[r][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [row[n:] for row in a]


def _quantities_at(gm, node: fx.Node, values: dict, device_values: dict, cache: dict, ctx) -> list[float]:
    if costs_nothing(node):
        return [0.0] * len(QUANTITIES)
    key = (_signature(gm, node, values), _signature(gm, node, device_values), node.meta.get("ppc.regions"))
    if key not in cache:
        cache[key] = _measure(gm, node, values, device_values, ctx)
    fwd, bwd, _, _, temp, view_of, param_bytes, _ = cache[key]
    if view_of is not None or _takes_from_view_tuple(node):
        moved = 0.0
    else:
        tensors = [values.get(n.name) for n in _arg_nodes(node)] + [values.get(node.name)]
        moved = (
            sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) + param_bytes
        )
    return [float(fwd), float(bwd), float(moved), float(temp)]


def evaluate(poly: tuple[Fraction, ...], basis: list[dict], point: dict[str, int]) -> float:
    return float(sum(c * _monomial(m, point) for c, m in zip(poly, basis)))


def formula(poly: tuple[Fraction, ...], basis: list[dict], symbols: dict[str, sympy.Symbol]) -> sympy.Expr:
    """The polynomial as a sympy expression with 3 significant digits, e.g. 1.57e+6*b*s**2 + ..."""
    expr = sympy.Integer(0)
    for c, m in zip(poly, basis):
        if c:
            term = sympy.Float(float(c), 3)
            for s, e in m.items():
                term *= symbols[s] ** e
            expr += term
    return expr
