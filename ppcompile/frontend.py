"""Frontend: load ``PATH.py:FACTORY``, build the model on the meta device, trace it with torch.fx."""

from __future__ import annotations

import dataclasses
import linecache
import traceback
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import sympy
import torch
from torch import fx, nn

from ppcompile.context import CompileConfig, CompileContext
from ppcompile.devices import get_profile
from ppcompile.errors import CompileError
from ppcompile.runtime.outputs import as_returned
from ppcompile.runtime.spec import ModelRef, SpecError, floating_shape, loss_of
from ppcompile.tracer import LIBRARY_DIRS, ForwardError, PipelineTracer


def load_context(ref_text: str, config: CompileConfig) -> CompileContext:
    """Build the model on the meta device (no weights allocated) and set up the context."""
    try:
        ref = ModelRef.parse(ref_text)
        spec = _build_on_meta(ref)
    except SpecError as e:
        raise CompileError(str(e)) from None
    except Exception as e:
        where = _model_frame(e, ref.path)
        on_meta = (
            " (the compiler builds the model on the meta device, allocating nothing, where code that "
            "reads a tensor's values while the model is built cannot run)"
            if "meta" in str(e)
            else ""
        )
        raise CompileError(f"{where}: building the model failed: {type(e).__name__}: {e}{on_meta}") from None
    lazy = sorted(
        {name.rpartition(".")[0] for name, p in spec.module.named_parameters() if nn.parameter.is_lazy(p)}
    )
    if lazy:
        raise CompileError(
            f"{ref}: layer {', '.join(lazy)} is not initialised (a lazy layer such as nn.LazyLinear takes "
            "its size from its first input); call the model once on the example inputs in the factory"
        )
    _refuse_hooks_on_the_model(ref, spec.module)
    if not config.trains:
        # Inference runs without autograd: nothing gets a gradient, nothing is saved for backward,
        # and the costs and the memory plan follow from that as they do for a frozen layer.
        spec.module.requires_grad_(False)
    input_names = list(spec.input_names)
    for name, example in zip(input_names, spec.example_inputs):
        if not isinstance(example, torch.Tensor):
            items = example.values() if isinstance(example, Mapping) else example
            items = items if isinstance(example, (Mapping, list, tuple)) else ()
            held = next((v for v in items if not isinstance(v, torch.Tensor)), None)
            what = type(example).__name__ + (f" holding a {type(held).__name__}" if held is not None else "")
            raise CompileError(
                f"{ref}: example input {name!r} is a {what}; forward's inputs must be tensors, or "
                "dicts, lists, tuples or named tuples of tensors: give a number as a 0-d tensor, and keep "
                "other values out of the inputs (on the model, or as forward's defaults)"
            )
    # A 0-d input (a scale, a temperature) has no batch dim: every micro-batch shares it.
    dims = {name: {0: "b"} if x.dim() else {} for name, x in zip(input_names, spec.example_inputs)}
    for name, named in spec.dims.items():
        if name not in dims:
            raise CompileError(
                f"{ref}: ModelSpec.dims names input {name!r}; forward's inputs are {input_names}"
            )
        dims[name] = dict(named)
    symbol_values: dict[str, int] = {}
    sized_by: dict[str, str] = {}  # symbol -> the input that gave its size first
    for name, example in zip(input_names, spec.example_inputs):
        for dim, symbol in dims[name].items():
            if not -example.dim() <= dim < example.dim():
                raise CompileError(
                    f"{ref}: ModelSpec.dims gives input {name!r} dim {dim} ({symbol!r}), but its example "
                    f"has {example.dim()} dims; name dims 0..{example.dim() - 1}"
                )
            size = int(example.shape[dim])
            first = sized_by.setdefault(symbol, name)
            if symbol_values.setdefault(symbol, size) != size:
                unnamed = [n for n in (first, name) if n not in spec.dims]
                hint = (
                    "; dim 0 of every input is taken as the batch b, which micro-batches split: where "
                    + " or ".join(f"{n!r}" for n in unnamed)
                    + " has no batch dim, give "
                    + " or ".join(f"ModelSpec(dims={{{n!r}: {{}}}})" for n in unnamed)
                    if unnamed
                    else ""
                )
                flat = [x for n, x in zip(input_names, spec.example_inputs) if n in (first, name)]
                if any(isinstance(m, torch.nn.EmbeddingBag) for m in spec.module.modules()) and all(
                    x.dim() == 1 and not x.is_floating_point() for x in flat
                ):
                    # Neither input has a batch dim to name: the bags' rows are the offsets' entries.
                    hint = (
                        "; a flat batch of tokens with its offsets (nn.EmbeddingBag) has no rows that "
                        "micro-batches can split: pad the bags to a (B, L) input, which EmbeddingBag takes "
                        "without offsets (padding_idx leaves the padding out of each bag)"
                    )
                raise CompileError(
                    f"{ref}: symbol {symbol!r} is {symbol_values[symbol]} in {first!r} and {size} in "
                    f"{name!r}{hint}"
                )
    symbols = {s: sympy.Symbol(s, integer=True, positive=True) for s in symbol_values}
    return CompileContext(
        config=config,
        ref=ref,
        spec=spec,
        profile=get_profile(config.device_profile),
        input_names=input_names,
        input_dims=dims,
        symbols=symbols,
        symbol_values=symbol_values,
    )


def _build_on_meta(ref: ModelRef):
    """The model and its example inputs on the meta device. A model whose construction reads a
    tensor's values (``parametrizations.orthogonal`` compares its weight with itself) is built on
    CPU instead, where it can, and moved to meta."""
    try:
        return ref.build("meta")
    except Exception as e:  # noqa: BLE001 - built again on CPU, or the first error is the user's
        if "meta" not in str(e):
            raise
        try:
            spec = ref.build("cpu")
        except Exception:  # noqa: BLE001 - the meta error says what the compiler needs
            raise e from None
    # Moving to meta makes each module's tensors anew: a weight two modules share (a tied LM
    # head) would come apart, and the program would train two copies.
    shared = _shared_tensors(spec.module)
    with torch.no_grad():
        spec.module.to("meta")
    _tie_again(spec.module, shared)
    inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in spec.example_inputs)
    return dataclasses.replace(spec, example_inputs=inputs)


def _shared_tensors(model: nn.Module) -> list[list[str]]:
    """The names of each parameter or buffer that several names hold, by tensor."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        by_tensor.setdefault(id(tensor), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def _tie_again(model: nn.Module, shared: list[list[str]]) -> None:
    """Point every name of each group in ``shared`` at its first name's tensor."""
    for first, *others in shared:
        owner, _, attribute = first.rpartition(".")
        tensor = getattr(model.get_submodule(owner), attribute)
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, tensor)


def _refuse_hooks_on_the_model(ref: ModelRef, model: nn.Module) -> None:
    """fx traces the model's forward, not its call, which would run the hooks registered on the
    model itself (those on its submodules run: traced into, or called by the stage code)."""
    registries = [
        ("forward pre-hook", model._forward_pre_hooks),
        ("forward hook", model._forward_hooks),
        ("backward hook", model._backward_hooks),
        ("backward pre-hook", model._backward_pre_hooks),
    ]
    found = next(((kind, hook) for kind, hooks in registries for hook in hooks.values()), None)
    if found is not None:
        kind, hook = found
        raise CompileError(
            f"{ref}: a {kind} ({getattr(hook, '__qualname__', type(hook).__name__)}) is registered on the "
            f"model itself, and the program runs {type(model).__name__}.forward without it, as fx traces "
            "it; register the hook on a submodule, or do its work in forward"
        )


DECIDED_NOTE = "control flow on shapes, decided for the example's"


def trace(ctx: CompileContext) -> fx.GraphModule:
    """Symbolically trace the meta model; an untraceable model is one line naming its code."""
    module: nn.Module = ctx.spec.module
    tracer, graph = _trace_at(ctx, ctx.spec.example_inputs)
    if tracer.checkpoint_calls and ctx.config.trains:
        ctx.notes.append(
            f"the model's own torch.utils.checkpoint calls ({tracer.checkpoint_calls}) are traced through: "
            "their layers save for backward what they would without it, and the compiler recomputes layers "
            "where --memory-per-device asks it to"
        )
    if tracer.decided:
        ctx.notes.append(
            f"{DECIDED_NOTE} ({_point(ctx.symbol_values)}): "
            + "; ".join(
                f"{where} -> {value}" + (f" ({count} times)" if count > 1 else "")
                for (where, value), count in Counter(tracer.decided).items()
            )
        )
    ctx.decided = list(tracer.decided)
    ctx.decided_formulas = tracer.decided_formulas
    if ctx.config.trains:
        _return_only_the_loss(ctx, graph, tracer)
    else:
        _return_outputs(ctx, graph)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    return gm


def check_decided_at(ctx: CompileContext, dims: dict[str, int]) -> None:
    """Trace again at the micro-batch shape ``--dims`` asks for: every condition the trace decided
    for the example's shapes must come out as it did there, or the traced graph is wrong there."""
    point = {**ctx.symbol_values, **dims}
    if not ctx.decided or point == ctx.symbol_values:
        return
    label = f"--dims {_point(dims)}"
    again, _ = _trace_at(ctx, _inputs_at(ctx, point), label)
    for (where, value), (_, other) in zip(ctx.decided, again.decided):
        if value != other:
            raise CompileError(
                f"{where} is {value} for the example's {_point(ctx.symbol_values)} but {other} for "
                f"{label}: the traced branch would be wrong there; give an example input of that shape instead"
            )


def _return_only_the_loss(ctx: CompileContext, graph: fx.Graph, tracer: PipelineTracer) -> None:
    """Make the graph return the loss alone, picked out of what forward returns by the rule the
    eager reference uses (``runtime.spec.loss_of``): ``(loss, logits)``, ``{"loss": loss, ...}``.
    The other values are still computed where forward computes them; nothing receives them."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    returned = output.args[0]
    if isinstance(returned, fx.Node) and _constructed_loss(returned) is None:
        return
    loss, shape, held, rest = _picked_loss(ctx, returned, tracer)
    ctx.notes.append(
        f"forward returns {shape}: the program trains on {held}, the loss; {rest} are computed as forward "
        "computes them, and dropped"
    )
    output.args = (loss,)
    if isinstance(returned, fx.Node):  # the dataclass or named tuple, which nothing reads now
        graph.erase_node(returned)


def _return_outputs(ctx: CompileContext, graph: fx.Graph) -> None:
    """For inference: the graph returns what forward returns, a dataclass or named tuple as a dict
    of its fields (the runtime holds no class of the model's)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    returned = output.args[0]
    fields = _constructed_fields(returned) if isinstance(returned, fx.Node) else None
    if fields is None:
        # A named tuple fx's pytree spec built again (a tuple default, a dict input) is one too.
        output.args = (as_returned(returned),)
        return
    ctx.notes.append(
        f"forward returns {returned.target.__name__}: the program returns its fields as a dict "
        f"({', '.join(fields)})"
    )
    output.args = (fields,)
    graph.erase_node(returned)


def _constructed_fields(node: fx.Node) -> dict | None:
    """The fields by name where ``node`` builds a dataclass or named tuple: fx records returning
    one as a call of its class on its fields' nodes."""
    cls = node.target
    if node.op != "call_function" or not isinstance(cls, type):
        return None
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
    elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
        names = list(cls._fields)
    else:
        return None
    return {**dict(zip(names, node.args)), **node.kwargs}


def _constructed_loss(node: fx.Node) -> fx.Node | None:
    """The ``loss`` field's node where ``node`` builds a dataclass or named tuple that has one."""
    loss = (_constructed_fields(node) or {}).get("loss")
    return loss if isinstance(loss, fx.Node) else None


def _picked_loss(ctx: CompileContext, returned, tracer: PipelineTracer) -> tuple[fx.Node, str, str, str]:
    """The loss in a returned dataclass or named tuple (a node), dict, tuple or list, and how the
    note names the container, the loss and the rest. Which element of a tuple it is can depend on
    shapes, which the tracer computes for the example's on meta tensors."""
    if isinstance(returned, fx.Node):
        kind = "a dataclass" if dataclasses.is_dataclass(returned.target) else "a named tuple"
        return (
            _constructed_loss(returned),
            f"{returned.target.__name__} ({kind})",
            "its loss",
            "its other fields",
        )

    def float_shape(value):
        if not isinstance(value, fx.Node):
            return floating_shape(value)
        try:
            return floating_shape(tracer.value_of(value))
        except Exception:  # noqa: BLE001 - an op meta tensors cannot run: the first element, as before
            return None

    try:
        loss = loss_of(returned, float_shape)
    except SpecError as e:
        raise CompileError(f"{ctx.ref}: {e}") from None
    if not isinstance(loss, fx.Node):
        raise CompileError(
            f"{ctx.ref}: forward returns {loss!r} where the loss should be; return the loss the model "
            "computes, or (loss, ...), or {'loss': loss, ...}"
        )
    if isinstance(returned, dict):
        return loss, "a dict", "its 'loss'", "the other entries"
    kind = "tuple" if isinstance(returned, tuple) else "list"
    position = next(i for i, value in enumerate(returned) if value is loss)
    first, scalars = float_shape(returned[0]), [i for i, v in enumerate(returned) if float_shape(v) == ()]
    if position == 0 and first is not None and any(size != 1 for size in first) and len(scalars) > 1:
        raise CompileError(
            f"{ctx.ref}: forward returns a {kind} of {len(returned)} whose first element is a tensor of "
            f"shape {list(first)} and elements {', '.join(map(str, scalars))} are scalars, so which is the "
            "loss is unclear; return the loss first, (loss, ...), or as {'loss': loss, ...}"
        )
    held = (
        "its first element"
        if position == 0
        else f"its element {position} (the only scalar after a non-scalar)"
    )
    return loss, f"a {kind} of {len(returned)}", held, "the others"


def _trace_at(ctx: CompileContext, example_inputs, dims: str = "") -> tuple[PipelineTracer, fx.Graph]:
    """The tracer (with the conditions it decided) and graph for these example inputs; ``dims``
    names the --dims they stand for, where they are not the factory's."""
    tracer = PipelineTracer(
        dict(zip(ctx.input_names, example_inputs)),
        ctx.ref.path,
        ctx.spec.input_groups,
        ctx.config.trains,
        ctx.device_type,
        ctx.spec.none_inputs,
    )
    try:
        graph = tracer.trace(ctx.spec.module)
        tracer.decided_formulas = tracer.decision_formulas(ctx.input_dims, ctx.symbols)
        tracer.drop_conditions(graph)  # the conditions' own nodes go: formulas first
    except Exception as e:
        where = _model_frame(e, ctx.ref.path)
        if dims:
            raise CompileError(
                f"{dims}: the model fails at that shape: {where}: {type(e).__name__}: {e}"
            ) from None
        if isinstance(e, ForwardError):
            raise CompileError(f"{where}: {e}") from None
        if "Proxy" in str(e) and "control flow" not in str(e):
            # torch.broadcast_shapes in MultivariateNormal: library code that takes sizes as ints.
            raise CompileError(
                f"{where}: torch.fx cannot trace this model ({type(e).__name__}: {e}); torch code here takes "
                "sizes as plain ints, and a traced tensor's sizes are not (torch.broadcast_shapes inside "
                "MultivariateNormal built in forward): write it with tensor ops (a diagonal Gaussian prior as "
                "Independent(Normal(loc, scale), 1)), or compute it outside forward"
            ) from None
        raise CompileError(
            f"{where}: torch.fx cannot trace this model ({type(e).__name__}: {e}); make control flow "
            "independent of tensor values (torch.where(cond, a, b) for a branch on a value)"
        ) from None
    return tracer, graph


def source_line(ctx: CompileContext, node_name: str) -> str:
    """``file:line: `code``` of the model code that made node ``node_name``, found by tracing again
    with fx's stack traces on (too slow to keep on for every compile); the model file alone where
    none is found."""
    tracer = PipelineTracer(
        dict(zip(ctx.input_names, ctx.spec.example_inputs)),
        ctx.ref.path,
        ctx.spec.input_groups,
        ctx.config.trains,
        ctx.device_type,
        ctx.spec.none_inputs,
    )
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(ctx.spec.module)
    except Exception:  # noqa: BLE001 - it traced once; this is for a message only
        return str(ctx.ref.path)
    node = next((n for n in graph.nodes if n.name == node_name), None)
    lines = (node.meta.get("stack_trace") or "").splitlines() if node is not None else []
    found = str(ctx.ref.path)
    for header, code in zip(lines, lines[1:]):
        header = header.strip()
        if header.startswith('File "'):
            filename, _, rest = header[len('File "') :].partition('", line ')
            if not filename.startswith(LIBRARY_DIRS):
                path = Path(filename)
                shown = ctx.ref.path if path.resolve() == Path(ctx.ref.path).resolve() else path.name
                found = f"{shown}:{rest.split(',')[0]}: `{code.strip()}`"
    return found


def _inputs_at(ctx: CompileContext, point: dict[str, int]) -> list:
    """The example inputs as meta tensors, their symbolic dims at ``point``."""
    return [
        torch.empty(shape, dtype=example.dtype, device="meta")
        for shape, example in zip(input_shapes_at(ctx, point), ctx.spec.example_inputs)
    ]


def input_shapes_at(ctx: CompileContext, point: dict[str, int]) -> list[list[int]]:
    """Each example input's shape with its symbolic dims at ``point`` (``ctx.symbol_values`` is the
    shape the program is compiled for: the example's, or --dims')."""
    shapes = []
    for name, example in zip(ctx.input_names, ctx.spec.example_inputs):
        shape = list(example.shape)
        for dim, symbol in ctx.input_dims[name].items():
            shape[dim] = point[symbol]
        shapes.append(shape)
    return shapes


def _point(values: dict[str, int]) -> str:
    return ", ".join(f"{name}={value}" for name, value in values.items())


def _model_frame(error: BaseException, model_path: str) -> str:
    """``file:line: code`` of the innermost frame inside the model file, else the file alone."""
    target = Path(model_path).resolve()
    found = model_path
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == target:
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            found = f"{model_path}:{frame.lineno}: `{code}`"
    return found
