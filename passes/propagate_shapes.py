"""Shape propagation: concrete shapes on the meta device, then symbolic ones.

Every tensor value gets ``ppc.shape``, a tuple of sympy expressions in the model's symbolic
dims (``b``, ``s``, ...). They are found by running the graph on meta tensors several
times: once at the example micro-batch, once per symbol with that symbol scaled, and once
with all of them scaled. Each dim is fitted as ``c * b**i * s**j`` and checked against the
last run, so ``[b, s, 768]`` or ``[b*s, 50257]`` come out exact. A dim that fits no such
monomial is the first of these that holds at every run: ``c + sum(a * symbol)`` (``s - 1``
after ``x[:, 1:]``), a dim of a tensor the node reads, an int from shapes it is given
(``b*(s - 1)`` rows after ``x.reshape(B * (T - 1), C)``); else it keeps its concrete size (the
program then serves only that size).

Keys written on each node:
  ppc.kind           "tensor", "tuple" (holding tensors), "none" or "other" (ints, sizes, devices)
  ppc.shape          symbolic shape (tensors)
  ppc.concrete       concrete shape at the example micro-batch (tensors)
  ppc.dtype          dtype (tensors)
  ppc.requires_grad  whether autograd tracks it (tensors): a gradient must flow back
  ppc.nbytes         bytes at the example micro-batch (tensors; for tuples, the distinct storages of
                     the tensors inside, which the memory model counts as what the node allocates)
  ppc.value          what a non-tensor value is at any micro-batch shape, where that is known: an int
                     or torch.Size from shapes (``T - 1`` after ``T = x.size(1)``: ``s - 1``), or a
                     float, bool or None computed from constants alone. A stage computes it from the
                     micro-batch's sizes instead of receiving it (``runtime.executor.size_value``)
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager

import sympy
import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from ppcompile.context import CompileContext, KnownValue
from ppcompile.errors import CompileError
from ppcompile.frontend import DECIDED_NOTE, source_line
from ppcompile.tracer import autograd_function, has_autocast, is_effect, run_on_fake_cpu, under_regions


class ValueRecorder(fx.Interpreter):
    """Runs a graph and keeps every node's value by name; ``runs_as`` as ``tracer.under_regions``
    takes it. With ``autocast_on_meta`` (a ``runs_as``), the graph runs on meta tensors and a node
    traced inside a ``torch.autocast`` region runs on fake CPU tensors under it instead, as
    ``tracer.run_on_fake_cpu`` does: on meta, autocast does nothing."""

    def __init__(
        self,
        gm: fx.GraphModule,
        runs_as: dict[str, str] | None = None,
        autocast_on_meta: dict[str, str] | None = None,
    ):
        super().__init__(gm)
        self.values: dict[str, object] = {}
        self.runs_as = runs_as
        self.autocast_on_meta = autocast_on_meta

    def run_node(self, node: fx.Node):
        try:
            if self.autocast_on_meta is not None and node.op.startswith("call_") and has_autocast(node):
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                module = self.module.get_submodule(node.target) if node.op == "call_module" else None
                result = run_on_fake_cpu(node, module, args, kwargs, self.autocast_on_meta)
            else:
                with under_regions(node, self.runs_as):
                    result = super().run_node(node)
        except Exception as e:
            raise NodeFailed(node.name, e, [self.values.get(n.name) for n in node.all_input_nodes]) from e
        self.values[node.name] = result
        return result


class NodeFailed(RuntimeError):
    """Running a graph stopped at node ``name`` with ``error``; ``inputs`` are the values of its
    input nodes."""

    def __init__(self, name: str, error: Exception, inputs: list | None = None):
        super().__init__(f"{name}: {type(error).__name__}: {error}")
        self.name, self.error, self.inputs = name, error, inputs or []


@contextmanager
def masks_without_values() -> Iterator[None]:
    """While this holds, torch.nn's attention modules and transformer containers make no decision
    that reads a mask's values, which meta and fake tensors do not have:

    - a mask given without ``is_causal`` is taken as not causal, instead of compared with a causal
      mask (``nn.TransformerDecoder(..., tgt_mask=mask)``: "Tensor.item() cannot be called on meta
      tensors");
    - the fast path is off, so an encoder in eval mode given a padding mask does not test that the
      padding is at the end (``_nested_tensor_from_mask_left_aligned`` has no meta kernel).

    Both pick kernels, not shapes; the stages run on real tensors, where torch decides as in eager.
    """
    from torch.nn.modules import transformer

    compare = transformer._detect_is_causal_mask

    def without_values(mask, is_causal=None, size=None):
        if is_causal is None and mask is not None and (mask.is_meta or isinstance(mask, FakeTensor)):
            return False
        return compare(mask, is_causal, size)

    fast_path = torch.backends.mha.get_fastpath_enabled()
    transformer._detect_is_causal_mask = without_values
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        transformer._detect_is_causal_mask = compare
        torch.backends.mha.set_fastpath_enabled(fast_path)


def run_meta(gm: fx.GraphModule, ctx: CompileContext, symbol_values: dict[str, int]) -> dict[str, object]:
    """Run the graph on meta tensors whose symbolic dims take ``symbol_values``."""
    recorder = ValueRecorder(gm, autocast_on_meta=autocast_on_cpu(ctx))
    # enable_grad: the graph runs as training does; a node inside a model's torch.no_grad() runs
    # under it (tracer.under_regions).
    with torch.device("meta"), torch.enable_grad(), masks_without_values():
        recorder.run(*_inputs(ctx, symbol_values, "meta"))
    return recorder.values


def run_fake_cpu(gm: fx.GraphModule, ctx: CompileContext, symbol_values: dict[str, int]) -> dict[str, object]:
    """The graph's values as CPU kernels lay them out (strides), on fake tensors: nothing is
    allocated. Meta kernels differ: attention's output is (B, H, T, D)-major on meta and
    (B, T, H, D)-major on CPU. Falls back to ``run_meta`` where an op cannot run on fake tensors."""
    try:
        return _run_fake_cpu(gm, ctx, symbol_values)
    except Exception:  # noqa: BLE001 - a data-dependent op
        return run_meta(gm, ctx, symbol_values)


def _run_fake_cpu(
    gm: fx.GraphModule, ctx: CompileContext, symbol_values: dict[str, int]
) -> dict[str, object]:
    on_cpu = copy.deepcopy(gm)
    # Non-fake inputs allowed: to_empty turns the model's meta weights into fake CPU ones.
    with FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad(), masks_without_values():
        on_cpu.to_empty(device="cpu")
        recorder = ValueRecorder(on_cpu, autocast_on_cpu(ctx))
        recorder.run(*_inputs(ctx, symbol_values, "cpu"))
    return recorder.values


def autocast_on_cpu(ctx: CompileContext) -> dict[str, str]:
    """``runs_as`` for running the program's nodes on CPU tensors as compiling does: the model's
    autocast regions for the device type the program is compiled for (measured on, with
    --profile) applied to them."""
    return {ctx.device_type: "cpu"}


def _inputs(ctx: CompileContext, symbol_values: dict[str, int], device: str) -> list[torch.Tensor]:
    inputs = []
    for name, example in zip(ctx.input_names, ctx.spec.example_inputs):
        shape = list(example.shape)
        for dim, symbol in ctx.input_dims[name].items():
            shape[dim] = symbol_values[symbol]
        inputs.append(torch.empty(shape, dtype=example.dtype, device=device))
    return inputs


def sample_values(name: str, value: int, count: int) -> list[list[int]]:
    """Lists of ``count`` distinct values for a symbol, the example's first, best first.

    The batch dim is safe to grow. Another dim (a sequence) may be capped by the model (a causal
    mask of ``block_size`` rows) or need a divisor (a patch size): shrink by halves, then by a
    fraction of itself, then by one, and grow only last. Each list is tried until the model runs.

    >>> sample_values("s", 64, 3)[0], sample_values("s", 6, 3)[0], sample_values("b", 4, 2)
    ([64, 32, 16], [6, 4, 2], [[4, 8], [4, 3]])
    """
    top = count - 1
    if name == "b":
        options = [[value * (k + 1) for k in range(count)], [value - k for k in range(count)]]
    else:
        options = [
            [value // 2**k for k in range(count)] if value % 2**top == 0 and value >= 2**top else None,
            [value * (count - k) // count for k in range(count)] if value % count == 0 else None,
            [value - k for k in range(count)],
            [value * (k + 1) for k in range(count)],
        ]
    # Below 2 a dim can broadcast or be squeezed away where the example's could not.
    smallest = 1 if name == "b" else 2
    return [o for o in options if o is not None and min(o) >= smallest and len(set(o)) == count]


def run_meta_somewhere(
    gm: fx.GraphModule, ctx: CompileContext, points: list[dict[str, int]], run=None, failures=None
):
    """``run_meta`` (or ``run``) at the first of ``points`` where the model runs: (point, values),
    else None; ``failures`` gets each point's error, in order."""
    for point in points:
        try:
            return point, (run or run_meta)(gm, ctx, point)
        except Exception as e:  # noqa: BLE001 - a size the model refuses: the next one
            if failures is not None:
                failures.append(e)
    return None


def propagate_shapes(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    base = dict(ctx.symbol_values)
    # Autocast leaves meta tensors alone: a model with torch.autocast regions is sized on fake CPU
    # tensors, where the regions give the dtypes the program will have.
    run = _run_fake_cpu if any(has_autocast(node) for node in gm.graph.nodes) else run_meta
    try:
        base_values = run(gm, ctx, base)
    except NodeFailed as e:
        first_line = str(e.error).splitlines()[0] if str(e.error) else ""
        node = next(n for n in gm.graph.nodes if n.name == e.name)
        if node.op == "call_module" and "meta" in str(e.error):
            module = gm.get_submodule(node.target)
            hint = (
                " (with momentum=None it averages over its batch count: give it a momentum)"
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.momentum is None
                else ""
            )
            raise CompileError(
                f"{source_line(ctx, e.name)}: `{node.target}` ({type(module).__name__}) reads a tensor's "
                f"value as it runs{hint}, which ppcompile cannot: it sizes every value on meta tensors "
                f"({first_line[:120]})"
            ) from None
        if node.target is operator.getitem and any(_is_integer_scalar(v) for v in e.inputs[1:]):
            raise CompileError(
                f"{source_line(ctx, e.name)}: indexing by a 0-d integer tensor reads its value as an "
                "int, which ppcompile cannot: it sizes every value from the input shapes; index by a "
                "1-element tensor and drop its dim (`table[idx.view(1)].squeeze(0)`, or "
                "`torch.index_select(table, 0, idx.view(1))`)"
            ) from None
        if node.op == "call_method" and node.target in ("item", "tolist"):
            raise CompileError(
                f"{source_line(ctx, e.name)}: forward reads a tensor's value ({node.target}()), which "
                "ppcompile cannot: it sizes every value from the input shapes; to log a value, return it "
                "beside the loss (return loss, {'name': value.detach()})"
            ) from None
        if node.target is F.one_hot and len(node.args) < 2 and "num_classes" not in node.kwargs:
            raise CompileError(
                f"{source_line(ctx, e.name)}: F.one_hot without num_classes takes its width from the "
                "largest label, a tensor's value, which ppcompile cannot read: it sizes every value "
                "from the input shapes; give num_classes (F.one_hot(y, num_classes=10))"
            ) from None
        if "item() cannot be called on meta tensors" in first_line:
            function = autograd_function(node.target)
            what = f"`{function.__name__}.forward`" if function is not None else f"`{e.name}`"
            raise CompileError(
                f"{source_line(ctx, e.name)}: {what} reads a tensor's value as an int or float (.item()), "
                "which ppcompile cannot: it sizes every value from the input shapes; keep it a tensor "
                "(x.abs().amax().clamp_min(1e-8) rather than max(x.abs().max().item(), 1e-8))"
            ) from None
        if "SparseMeta" in first_line:
            raise CompileError(
                f"{source_line(ctx, e.name)}: {e.name} computes on a sparse tensor, which has no meta kernel "
                "here, and ppcompile sizes every value on meta tensors; pass messages densely "
                "(zeros(n, d).index_add_(0, dst, h[src])) or use a dense adjacency"
            ) from None
        raise CompileError(
            f"{source_line(ctx, e.name)}: the shape of {e.name} cannot be computed from the input shapes "
            f"({type(e.error).__name__}: {first_line[:200]}); ppcompile sizes every value from them: "
            "use shapes the inputs fix (a mask instead of boolean indexing or torch.where with one "
            "argument, dense instead of sparse routing, zeros(n).index_add_(0, i, ones) instead of bincount)"
        ) from None
    scaled_runs = {}
    for name, value in base.items():
        # A second size for each symbol, one the model accepts, tells which dims scale with it.
        tries = [{**base, name: values[1]} for values in sample_values(name, value, 2)]
        failures: list[Exception] = []
        found = run_meta_somewhere(gm, ctx, tries, run, failures)
        if found is None:
            first = failures[0]
            error = first.error if isinstance(first, NodeFailed) else first
            why = str(error).splitlines() or [""]
            where = source_line(ctx, first.name) + ": " if isinstance(first, NodeFailed) else ""
            # A loop or branch decided for the example's shapes is the usual reason.
            decided = next((n for n in ctx.notes if n.startswith(DECIDED_NOTE)), None)
            raise CompileError(
                f"{ctx.ref} runs only at its example's {name}={value}: tried {name} = "
                f"{', '.join(dict.fromkeys(str(t[name]) for t in tries))}; at {name}={tries[0][name]}, {where}"
                f"{type(error).__name__}: {why[0][:160]}"
                + (
                    f"; the graph was traced with {decided}, which holds at that size only: leave {name} out "
                    "of ModelSpec.dims"
                    if decided
                    else "; give an example whose dims can change"
                )
            )
        scaled_runs[name] = (found[0][name], found[1])
    # Every symbol at its second size at once: a fit that held for one symbol alone but not
    # with the others moved is no fit. (None: the model refuses that mix; each fit stands alone.)
    check_point = {name: scaled_runs[name][0] for name in base}
    check = run_meta_somewhere(gm, ctx, [check_point], run) if base else (base, base_values)
    check_values = check[1] if check else None
    # Where the model ran, and what it computed there: a non-tensor value must match at each.
    runs = [(base, base_values)]
    runs += [({**base, name: new_value}, values) for name, (new_value, values) in scaled_runs.items()]
    runs += [] if check_values is None else [(check_point, check_values)]

    for node in gm.graph.nodes:
        value = base_values.get(node.name)
        node.meta["ppc.kind"] = _kind(value)
        if node.meta["ppc.kind"] in ("other", "none"):
            known = _known_value(node, runs, ctx)
            if known is not None:
                node.meta["ppc.value"] = known
        if node.meta["ppc.kind"] == "tuple":
            # nn.LSTM's (output, (h, c)): what it allocates, though no single tensor holds it.
            node.meta["ppc.nbytes"] = tuple_nbytes(value)
        if not isinstance(value, torch.Tensor):
            continue
        shape = []
        for dim, size in enumerate(value.shape):
            expr = _fit_dim(node.name, dim, int(size), base, scaled_runs, ctx, check_values is not None)
            if not _dim_holds(expr, node.name, dim, runs, ctx):
                # b*(s - 1) rows after a reshape by ints from shapes: equal to an input's dim, or to
                # such an int, at every run; else the concrete size.
                candidates = (c for c in _dim_candidates(node) if _dim_holds(c, node.name, dim, runs, ctx))
                expr = next(candidates, sympy.Integer(int(size)))
            shape.append(expr)
        node.meta["ppc.shape"] = tuple(shape)
        node.meta["ppc.concrete"] = tuple(int(s) for s in value.shape)
        node.meta["ppc.dtype"] = value.dtype
        node.meta["ppc.requires_grad"] = bool(value.requires_grad)
        node.meta["ppc.nbytes"] = value.numel() * value.element_size()
    _items_after_their_tuple(gm)
    _refuse_batch_along_sequence(gm, ctx)
    _note_samples_related(gm, ctx)
    if ctx.config.trains:
        _one_element_loss_as_scalar(gm, ctx)
        _refuse_a_loss_not_scalar(gm, ctx)
    return gm


def _refuse_a_loss_not_scalar(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Training needs the scalar loss: said before the costly passes run, and for a model that
    returns no loss at all (logits to serve), where the other way lies."""
    loss = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    if isinstance(loss, fx.Node) and loss.meta.get("ppc.kind") == "tensor" and loss.meta["ppc.shape"] == ():
        return
    shape = loss.meta.get("ppc.concrete") if isinstance(loss, fx.Node) else None
    raise CompileError(
        f"{ctx.ref}: forward must return the scalar loss for training (a 0-d tensor, (loss, ...) or "
        f"{{'loss': loss, ...}}); its loss is "
        + (f"a tensor of shape {list(shape)}" if shape is not None else "not a tensor")
        + "; reduce it with .mean() or .sum(), or compile the model for inference with "
        "--schedule forward-only"
    )


def _one_element_loss_as_scalar(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """A loss of one element in some dims (``loss.unsqueeze(0)``, a DataParallel habit) is
    trained as eager trains it, ``loss.backward()`` taking it as its one element: the graph
    returns it reshaped to 0-d, which is what the runtime's micro-batch losses are."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    loss = output.args[0]
    if not isinstance(loss, fx.Node) or loss.meta.get("ppc.kind") != "tensor":
        return
    concrete = loss.meta["ppc.concrete"]
    if not concrete or any(size != 1 for size in loss.meta["ppc.shape"]):
        return
    with gm.graph.inserting_after(loss):
        scalar = gm.graph.create_node("call_method", "reshape", (loss, ()), name="scalar_loss")
    scalar.meta.update(loss.meta)
    scalar.meta.update({"ppc.shape": (), "ppc.concrete": ()})
    output.args = (scalar,)
    ctx.notes.append(
        f"the loss has shape {list(concrete)}: the program trains on its one element, as backward() does"
    )


# How the note begins where forward relates the samples of a batch to each other: the CLI repeats
# it as a warning, since micro-batches change what such a loss computes.
SAMPLES_RELATED = "forward relates the samples of a micro-batch to each other"


def _note_samples_related(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """A note where a value has the batch dim b in two dims (a contrastive loss's [b, b]
    similarities): a pipeline, like gradient accumulation, computes it per micro-batch, so each
    sample meets the micro-batch's rows, not the whole batch's."""
    if ctx.config.microbatches == 1 or "b" not in ctx.symbols:
        return
    b = ctx.symbols["b"]
    for node in gm.graph.nodes:
        shape = node.meta.get("ppc.shape", ()) if node.meta.get("ppc.kind") == "tensor" else ()
        if sum(1 for dim in shape if b in sympy.sympify(dim).free_symbols) >= 2:
            shown = "[" + ", ".join(str(dim) for dim in shape) + "]"
            ctx.notes.append(
                f"{SAMPLES_RELATED}: {source_line(ctx, node.name)} is {shown}, so each sample meets the "
                "other rows of its micro-batch only, not the whole batch's, as under gradient accumulation "
                "(an in-batch contrastive loss gets fewer negatives); use fewer, larger micro-batches where "
                "that matters, and lay out a batch of pairs so that each micro-batch holds whole pairs"
            )
            return


def _is_integer_scalar(value) -> bool:
    """A 0-d integer tensor, which torch's indexing reads as an int."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not value.dtype.is_floating_point
        and not value.dtype.is_complex
        and value.dtype != torch.bool
    )


def _batch_first(module: torch.nn.Module) -> bool | None:
    """A module's ``batch_first`` (a transformer layer's is its attention's); None: it has none."""
    if isinstance(module, (torch.nn.TransformerEncoder, torch.nn.TransformerDecoder)):
        module = module.layers[0]
    found = getattr(getattr(module, "self_attn", module), "batch_first", None)
    return found if isinstance(found, bool) else None


def _refuse_batch_along_sequence(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """A module built ``batch_first=False`` (nn.Transformer's layers, nn.MultiheadAttention, the
    RNNs by default) reads (sequence, batch, features); where the batch symbol is its dim 0, the
    inputs are sequence first and micro-batches would cut every sequence into pieces."""
    batch = ctx.symbols.get("b")
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        module = gm.get_submodule(node.target)
        shape = node.args[0].meta.get("ppc.shape")
        if _batch_first(module) is not False or shape is None or len(shape) != 3:
            continue
        if batch in shape[0].free_symbols and batch not in shape[1].free_symbols:
            named = {
                name: {**{d: sym for d, sym in dims.items() if d not in (0, 1)}, 0: "s", 1: "b"}
                for name, dims in ctx.input_dims.items()
                if dims.get(0) == "b" and name not in ctx.spec.dims
            }
            raise CompileError(
                f"{source_line(ctx, node.name)}: `{node.target}` ({type(module).__name__}, batch_first=False) "
                f"reads its input sequence first, [{', '.join(map(str, shape))}], but dim 0 of the inputs is "
                f"taken as the batch, which micro-batches split: each would get a piece of every sequence; "
                f"name the batch dim, ModelSpec(model, inputs, dims={named}), or build the model batch first"
            )


def _items_after_their_tuple(gm: fx.GraphModule) -> None:
    """Move each item taken from a tuple of tensors (``h.split(4, -1)``, nn.LSTM's ``(out, (h,
    c))``) to just after the node that made the tuple. A tuple cannot cross a cut, its items can:
    where the model takes them as it goes (``[head(p) for head, p in zip(heads, h.split(4))]``)
    no cut could otherwise fall between the first item and the last."""
    for node in list(gm.graph.nodes):
        if node.meta.get("ppc.kind") != "tuple":
            continue
        anchor, pending = node, [node]
        while pending:
            source = pending.pop(0)
            for user in list(source.users):
                if user.op == "call_function" and user.target is operator.getitem and user.args[0] is source:
                    anchor.append(user)
                    anchor = user
                    if user.meta.get("ppc.kind") == "tuple":
                        pending.append(user)


def _fit_dim(name, dim, size, base, scaled_runs, ctx, affine: bool) -> sympy.Expr:
    """Fit ``size`` as c * prod(symbol**exponent) from one scaled run per symbol. Where no such
    monomial fits: as c + sum(a * symbol) (``s - 1`` after ``x[:, 1:]``) if ``affine`` (a run with
    every symbol moved will check it), else the concrete size."""
    if size == 0:
        return sympy.Integer(0)
    observed = {}
    for symbol, (new_value, values) in scaled_runs.items():
        other = values[name]
        if not isinstance(other, torch.Tensor) or other.dim() <= dim:
            return sympy.Integer(size)
        observed[symbol] = (new_value, int(other.shape[dim]))
    expr = sympy.Integer(1)
    denominator = 1
    for symbol, (new_value, other) in observed.items():
        ratio = other / size
        if ratio == 1:
            continue
        exponent = math.log(ratio) / math.log(new_value / base[symbol]) if ratio > 0 else None
        if exponent is None or abs(exponent - round(exponent)) > 1e-9 or round(exponent) < 1:
            return _fit_affine(size, observed, base, ctx) if affine else sympy.Integer(size)
        exponent = round(exponent)
        expr *= ctx.symbols[symbol] ** exponent
        denominator *= base[symbol] ** exponent
    coefficient = sympy.Rational(size, denominator)
    return coefficient * expr


def _dim_holds(expr: sympy.Expr, name: str, dim: int, runs: list, ctx) -> bool:
    """Whether dim ``dim`` of tensor ``name`` is ``expr`` in every run of ``runs``."""
    for point, values in runs:
        value = values.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() <= dim:
            return False
        if expr.subs({ctx.symbols[s]: v for s, v in point.items()}) != value.shape[dim]:
            return False
    return True


def _dim_candidates(node: fx.Node) -> list[sympy.Expr]:
    """What a dim of ``node`` may be besides a fit: a symbolic dim of a tensor it reads, or an int
    from shapes it is given (``x.reshape(B * (T - 1), C)``)."""
    found = []
    for arg in node.all_input_nodes:
        if arg.meta.get("ppc.kind") == "tensor":
            found += arg.meta["ppc.shape"]
        elif arg.meta.get("ppc.value") is not None:
            found += arg.meta["ppc.value"].exprs
    return [e for e in dict.fromkeys(found) if e.free_symbols]


def _fit_affine(size: int, observed: dict, base: dict[str, int], ctx) -> sympy.Expr:
    """``size`` as c + sum(a * symbol), from ``observed``: symbol -> (its second value, the size
    seen there).

    >>> from types import SimpleNamespace
    >>> ctx = SimpleNamespace(symbols={"b": sympy.Symbol("b"), "s": sympy.Symbol("s")})
    >>> _fit_affine(31, {"b": (8, 31), "s": (16, 15)}, {"b": 4, "s": 32}, ctx)
    s - 1
    """
    expr = sympy.Integer(size)
    for symbol, (new_value, other) in observed.items():
        slope = sympy.Rational(other - size, new_value - base[symbol])
        expr += slope * (ctx.symbols[symbol] - base[symbol])
    return sympy.expand(expr)


_MISSING = object()

# Arithmetic on ints from shapes, as sympy computes it; the runtime evaluates floor and Mod too.
_INT_OPS = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.floordiv: lambda a, b: sympy.floor(a / b),
    operator.mod: sympy.Mod,
    operator.neg: operator.neg,
}


def _known_value(node: fx.Node, runs: list, ctx) -> KnownValue | None:
    """What a non-tensor value is at any size, or None where that is not known (a device, grad
    mode, a value made by an operation this does not follow). An int is derived from
    the shapes and ints it is computed from (``x.size(1) - 1`` is ``s - 1``); a float, bool or
    None is a constant when computed from constants alone (``1.0 / math.sqrt(64)``). Either is
    kept only if it gives what every run in ``runs`` ((symbol values, node values) at several
    sizes) saw."""
    value = runs[0][1].get(node.name)
    if value is None or isinstance(value, (bool, float)):
        inputs = [n.meta.get("ppc.value") for n in node.all_input_nodes]
        from_constants = all(k is not None and not any(e.free_symbols for e in k.exprs) for k in inputs)
        seen = [values.get(node.name, _MISSING) for _, values in runs]
        if (
            from_constants
            and not is_effect(node)
            and all(type(v) is type(value) and v == value for v in seen)
        ):
            return KnownValue("constant", constant=value)
        return None
    candidate = _derived_value(node)
    if candidate is None:
        return None
    if all(_holds(candidate, point, values.get(node.name, _MISSING), ctx) for point, values in runs):
        return candidate
    return None


def _holds(candidate: KnownValue, point: dict[str, int], observed, ctx) -> bool:
    """Whether ``candidate`` at the symbol values ``point`` is the value a run there saw."""
    if _int_kind(observed) != candidate.kind:
        return False
    items = [observed] if candidate.kind == "int" else list(observed)
    at = {ctx.symbols[s]: v for s, v in point.items()}
    return len(items) == len(candidate.exprs) and all(e.subs(at) == i for e, i in zip(candidate.exprs, items))


def _derived_value(node: fx.Node) -> KnownValue | None:
    """The value of a size, a shape, an item of one or arithmetic on them, from the symbolic shapes
    and values of what it reads; None for any other operation."""

    def shape_of(arg):
        is_tensor = isinstance(arg, fx.Node) and arg.meta.get("ppc.kind") == "tensor"
        return tuple(arg.meta["ppc.shape"]) if is_tensor else None

    def known(arg) -> KnownValue | None:
        if type(arg) is int:
            return KnownValue("int", (sympy.Integer(arg),))
        if type(arg) is tuple:  # a literal such as (h.size(-1),): known where each item is an int
            items = [known(a) for a in arg]
            if all(i is not None and i.kind == "int" for i in items):
                return KnownValue("tuple", tuple(i.exprs[0] for i in items))
            return None
        return arg.meta.get("ppc.value") if isinstance(arg, fx.Node) else None

    args = node.args
    if node.op == "call_method" and node.target in ("size", "numel", "dim") and shape_of(args[0]) is not None:
        shape = shape_of(args[0])
        if node.target == "numel":
            return KnownValue("int", (sympy.Mul(*shape),))
        if node.target == "dim":
            return KnownValue("int", (sympy.Integer(len(shape)),))
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
        if dim is None:
            return KnownValue("torch.Size", shape)
        return KnownValue("int", (shape[dim],)) if type(dim) is int else None
    if node.op != "call_function":
        return None
    if node.target is getattr and args[1] in ("shape", "ndim") and shape_of(args[0]) is not None:
        shape = shape_of(args[0])
        return (
            KnownValue("torch.Size", shape)
            if args[1] == "shape"
            else KnownValue("int", (sympy.Integer(len(shape)),))
        )
    if node.target is len:
        shape, container = shape_of(args[0]), known(args[0])
        if shape is not None and shape:
            return KnownValue("int", (shape[0],))
        if container is not None and container.kind in _SEQUENCE_KINDS:
            return KnownValue("int", (sympy.Integer(len(container.exprs)),))
        return None
    if node.target is operator.getitem:
        container, index = known(args[0]), args[1]
        if container is None or container.kind not in _SEQUENCE_KINDS:
            return None
        if type(index) is int:
            return KnownValue("int", (container.exprs[index],))
        if isinstance(index, slice) and all(
            type(i) in (int, type(None)) for i in (index.start, index.stop, index.step)
        ):
            return KnownValue(container.kind, container.exprs[index])
        return None
    if node.target is operator.add and not node.kwargs:
        # Sizes joined (input_shape[:-1] + (d,), (-1,) + input_shape[1:]): a torch.Size if
        # either is one, as torch.Size's own + and reflected + make.
        left, right = (known(a) for a in args)
        if left is not None and right is not None and {left.kind, right.kind} <= set(_SEQUENCE_KINDS):
            kind = "torch.Size" if "torch.Size" in (left.kind, right.kind) else "tuple"
            return KnownValue(kind, left.exprs + right.exprs)
    if node.target in _INT_OPS and not node.kwargs:
        operands = [known(a) for a in args]
        if any(o is None or o.kind != "int" for o in operands):
            return None
        return KnownValue("int", (_INT_OPS[node.target](*(o.exprs[0] for o in operands)),))
    return None


_SEQUENCE_KINDS = ("torch.Size", "tuple")


def _int_kind(value) -> str | None:
    """ "int", "torch.Size" or "tuple" for an int, a torch.Size or a tuple of ints (bools are not
    ints here); else None."""
    if type(value) is int:
        return "int"
    if isinstance(value, torch.Size):
        return "torch.Size"
    return "tuple" if type(value) is tuple and all(type(v) is int for v in value) else None


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
