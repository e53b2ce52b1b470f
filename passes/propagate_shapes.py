"""Shape propagation: concrete shapes on the meta device, then symbolic ones.

Every tensor value gets ``ppc.shape``, a tuple of sympy expressions in the model's symbolic
dims (``b``, ``s``, ...). They are found by running the graph on meta tensors several
times: once at the example micro-batch, once per symbol with that symbol scaled, and once
with all of them scaled. Each dim is fitted as ``c * b**i * s**j`` and checked against the
last run, so ``[b, s, 768]`` or ``[b*s, 50257]`` come out exact; a dim that fits no such
monomial keeps its concrete size (the program then serves only that size).

Keys written on each node:
  ppc.kind           "tensor", "tuple" (holding tensors), "none" or "other" (ints, sizes, devices)
  ppc.shape          symbolic shape (tensors)
  ppc.concrete       concrete shape at the example micro-batch (tensors)
  ppc.dtype          dtype (tensors)
  ppc.requires_grad  whether autograd tracks it (tensors): a gradient must flow back
  ppc.nbytes         bytes at the example micro-batch (tensors; for tuples, the distinct storages of
                     the tensors inside, which the memory model counts as what the node allocates)
"""

from __future__ import annotations

import copy
import math

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from ppcompile.context import CompileContext


class ValueRecorder(fx.Interpreter):
    """Runs a graph and keeps every node's value by name."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        self.values[node.name] = result
        return result


def run_meta(gm: fx.GraphModule, ctx: CompileContext, symbol_values: dict[str, int]) -> dict[str, object]:
    """Run the graph on meta tensors whose symbolic dims take ``symbol_values``."""
    recorder = ValueRecorder(gm)
    with torch.device("meta"):
        recorder.run(*_inputs(ctx, symbol_values, "meta"))
    return recorder.values


def run_fake_cpu(gm: fx.GraphModule, ctx: CompileContext, symbol_values: dict[str, int]) -> dict[str, object]:
    """The graph's values as CPU kernels lay them out (strides), on fake tensors: nothing is
    allocated. Meta kernels differ: attention's output is (B, H, T, D)-major on meta and
    (B, T, H, D)-major on CPU. Falls back to ``run_meta`` where an op cannot run on fake tensors."""
    on_cpu = copy.deepcopy(gm)
    try:
        # Non-fake inputs allowed: to_empty turns the model's meta weights into fake CPU ones.
        with FakeTensorMode(allow_non_fake_inputs=True):
            on_cpu.to_empty(device="cpu")
            recorder = ValueRecorder(on_cpu)
            recorder.run(*_inputs(ctx, symbol_values, "cpu"))
        return recorder.values
    except Exception:  # noqa: BLE001 - a data-dependent op
        return run_meta(gm, ctx, symbol_values)


def _inputs(ctx: CompileContext, symbol_values: dict[str, int], device: str) -> list[torch.Tensor]:
    inputs = []
    for name, example in zip(ctx.input_names, ctx.spec.example_inputs):
        shape = list(example.shape)
        for dim, symbol in ctx.input_dims[name].items():
            shape[dim] = symbol_values[symbol]
        inputs.append(torch.empty(shape, dtype=example.dtype, device=device))
    return inputs


def _scaled(value: int) -> tuple[int, int] | None:
    """A second value for a symbol and the factor between them: halve when possible, else double."""
    if value % 2 == 0 and value >= 4:
        return value // 2, 2
    return value * 2, 2


def propagate_shapes(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    base = dict(ctx.symbol_values)
    base_values = run_meta(gm, ctx, base)
    scaled_runs = {}
    for name, value in base.items():
        # The batch dim is safe to double; other dims (sequence) may be capped by the model, so halve.
        new_value = value * 2 if name == "b" else _scaled(value)[0]
        scaled_runs[name] = (new_value, run_meta(gm, ctx, {**base, name: new_value}))
    check_point = {name: scaled_runs[name][0] for name in base}
    check_values = run_meta(gm, ctx, check_point) if base else base_values

    for node in gm.graph.nodes:
        value = base_values.get(node.name)
        node.meta["ppc.kind"] = _kind(value)
        if node.meta["ppc.kind"] == "tuple":
            # nn.LSTM's (output, (h, c)): what it allocates, though no single tensor holds it.
            node.meta["ppc.nbytes"] = tuple_nbytes(value)
        if not isinstance(value, torch.Tensor):
            continue
        shape = []
        for dim, size in enumerate(value.shape):
            expr = _fit_dim(node.name, dim, int(size), base, scaled_runs, ctx)
            observed = check_values[node.name].shape[dim]
            if expr.subs({ctx.symbols[s]: v for s, v in check_point.items()}) != observed:
                expr = sympy.Integer(int(size))
            shape.append(expr)
        node.meta["ppc.shape"] = tuple(shape)
        node.meta["ppc.concrete"] = tuple(int(s) for s in value.shape)
        node.meta["ppc.dtype"] = value.dtype
        node.meta["ppc.requires_grad"] = bool(value.requires_grad)
        node.meta["ppc.nbytes"] = value.numel() * value.element_size()
    return gm


def _fit_dim(name, dim, size, base, scaled_runs, ctx) -> sympy.Expr:
    """Fit ``size`` as c * prod(symbol**exponent) from one scaled run per symbol."""
    if size == 0:
        return sympy.Integer(0)
    expr = sympy.Integer(1)
    denominator = 1
    for symbol, (new_value, values) in scaled_runs.items():
        other = values[name]
        if not isinstance(other, torch.Tensor) or other.dim() <= dim:
            return sympy.Integer(size)
        ratio = other.shape[dim] / size
        if ratio == 1:
            continue
        exponent = math.log(ratio) / math.log(new_value / base[symbol])
        if abs(exponent - round(exponent)) > 1e-9 or round(exponent) < 1:
            return sympy.Integer(size)
        exponent = round(exponent)
        expr *= ctx.symbols[symbol] ** exponent
        denominator *= base[symbol] ** exponent
    coefficient = sympy.Rational(size, denominator)
    return coefficient * expr


def tuple_nbytes(value) -> int:
    """Bytes of the distinct storages of the tensors inside a (nested) tuple or list."""
    storages = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[StorageWeakRef(storage)] = storage.nbytes()
    return sum(storages.values())


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return "tuple"  # e.g. nn.MultiheadAttention's (output, None): costed, never sent whole
    if value is None:
        return "none"
    return "other"
