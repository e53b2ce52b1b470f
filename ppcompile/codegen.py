"""Code generation: one readable Python module per stage.

The emitted ``forward`` is the stage: one line per node, each commented with its
symbolic shape, its receives and sends listed with peers and shapes at the top, and a ``del``
after a tensor's last use, so that it is freed there as in eager PyTorch. Output is
deterministic: the same graph gives byte-identical text.
"""

from __future__ import annotations

import builtins
import keyword
import math
import operator
import re

import sympy
import torch
from torch import fx

from ppcompile.context import CompileContext, StageGraph
from ppcompile.errors import CompileError
from ppcompile.memory import updates_own_buffers
from ppcompile.passes.order_mutations import inputs_written, is_in_place, storage_of, written_buffers
from ppcompile.runtime.outputs import output_leaves
from ppcompile.runtime.spec import MODEL_FILE, MODEL_MODULE_PREFIX
from ppcompile.runtime.stage import function_attribute
from ppcompile.tracer import assign_items, autograd_function, rebind_buffer

_INFIX = {
    operator.add: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.truediv: "/",
    operator.floordiv: "//",
    operator.mod: "%",
    operator.pow: "**",
    operator.matmul: "@",
    operator.eq: "==",
    operator.ne: "!=",
    operator.lt: "<",
    operator.le: "<=",
    operator.gt: ">",
    operator.ge: ">=",
    operator.and_: "&",
    operator.or_: "|",
    operator.xor: "^",
    operator.lshift: "<<",
    operator.rshift: ">>",
}
_INPLACE = {
    operator.iadd: "+=",
    operator.isub: "-=",
    operator.imul: "*=",
    operator.itruediv: "/=",
}
_UNARY = {operator.neg: "-", operator.pos: "+", operator.invert: "~", operator.not_: "not "}
_RESERVED = {"self", "torch", "operator", "math", "builtins", "inf", "nan"}


def format_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def format_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(meta: dict) -> str:
    """``[b, s, 64] float32`` for a tensor value."""
    return f"{format_shape(meta['ppc.shape'])} {format_dtype(meta['ppc.dtype'])}"


def _describe_leaf(leaf) -> str:
    """A returned value: ``[b, 10] float32`` for a tensor, ``int s`` for a size, a constant as it is."""
    if not isinstance(leaf, fx.Node):
        return repr(leaf)
    if leaf.meta.get("ppc.kind") == "tensor":
        return describe(leaf.meta)
    known = leaf.meta.get("ppc.value")
    return known.text() if known is not None else str(leaf.meta.get("ppc.kind", "a value"))


class _Emitter:
    def __init__(self, graph: fx.Graph):
        self.names: dict[str, str] = {}
        self.imports: set[str] = {"torch"}
        self.functions: list[str] = []  # custom autograd.Functions called, as "module:qualname"
        used = set()
        for node in graph.nodes:
            name = node.name
            if name in _RESERVED or keyword.iskeyword(name) or hasattr(builtins, name):
                name = f"{name}_"
            while name in used:
                name = f"{name}_"
            used.add(name)
            self.names[node.name] = name

    def value(self, a, in_index: bool = False) -> str:
        if isinstance(a, fx.Node):
            return self.names[a.name]
        if isinstance(a, tuple):
            if in_index and a:
                return ", ".join(self.value(x, True) for x in a)
            inner = ", ".join(self.value(x) for x in a)
            return f"({inner},)" if len(a) == 1 else f"({inner})"
        if isinstance(a, list):
            return "[" + ", ".join(self.value(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {self.value(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            parts = ["" if p is None else self.value(p) for p in (a.start, a.stop, a.step)]
            text = ":".join(parts) if a.step is not None else ":".join(parts[:2])
            return (
                text if in_index else f"slice({', '.join(self.value(p) for p in (a.start, a.stop, a.step))})"
            )
        if a is Ellipsis:
            return "..."
        if isinstance(a, float):
            if math.isinf(a):
                return 'float("inf")' if a > 0 else 'float("-inf")'
            if math.isnan(a):
                return 'float("nan")'
            return repr(a)
        if isinstance(a, complex):  # S4D's 1j * A_imag
            return f"complex({self.value(a.real)}, {self.value(a.imag)})"
        if isinstance(a, (torch.dtype, torch.layout, torch.memory_format)):
            return str(a)
        if isinstance(a, torch.device):
            return f"torch.device({str(a)!r})"
        if isinstance(a, torch.Size):
            return self.value(tuple(a))
        if a is None or isinstance(a, (bool, int, str)):
            return repr(a)
        raise CompileError(f"cannot write constant {a!r} of type {type(a).__name__} into a stage file")

    def call_args(self, args, kwargs) -> str:
        parts = [self.value(a) for a in args]
        parts += [f"{k}={self.value(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    def function_name(self, target) -> str:
        function = autograd_function(target)
        if function is not None:  # the model's own torch.autograd.Function, held by the stage
            module = function.__module__
            ref = (
                f"{MODEL_FILE if module.startswith(MODEL_MODULE_PREFIX) else module}:{function.__qualname__}"
            )
            if ref not in self.functions:
                self.functions.append(ref)
            return f"self.functions.{function_attribute(ref)}.apply"
        if getattr(target, "__module__", None) == "_operator" or target in (getattr, len, float, int):
            if target in (getattr, len, float, int):
                return target.__name__
            self.imports.add("operator")
            return f"operator.{target.__name__}"
        if isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields"):
            # A named tuple of the model's, which fx builds as a call where one is handed on (inside
            # a returned dict): the stage file cannot import the model's module, so it builds one
            # with the same name and fields, which the program returns as the same record.
            self.imports.add("collections")
            return f"collections.namedtuple({target.__name__!r}, {tuple(target._fields)!r})"
        name = fx.node._get_qualified_name(target)
        if name.startswith("ppcompile.runtime."):  # the runtime's own ops, such as the fused loss
            self.imports.add(name.rsplit(".", 1)[0])
            return name
        root = name.split(".")[0]
        if root not in ("torch", "math", "builtins", "operator"):
            raise CompileError(
                f"stage code cannot call {name}: only torch, math and operator functions are supported"
            )
        self.imports.add(root)
        return name

    def expression(self, node: fx.Node) -> str:
        args, kwargs = node.args, node.kwargs
        if node.op == "get_attr":
            return "self." + attribute_path(node.target)
        if node.op == "call_module":
            return f"self.{attribute_path(node.target)}({self.call_args(args, kwargs)})"
        if node.op == "call_method":
            return f"{self.value(args[0])}.{node.target}({self.call_args(args[1:], kwargs)})"
        target = node.target
        if not kwargs:
            if target in _INFIX and len(args) == 2:
                return f"{self.value(args[0])} {_INFIX[target]} {self.value(args[1])}"
            if target in _UNARY and len(args) == 1:
                return f"{_UNARY[target]}{self.value(args[0])}"
            if target is operator.getitem:
                return f"{self.value(args[0])}[{self.value(args[1], in_index=True)}]"
            if target is getattr and len(args) == 2 and isinstance(args[1], str):
                return f"{self.value(args[0])}.{args[1]}"
        return f"{self.function_name(target)}({self.call_args(args, kwargs)})"


def attribute_path(fqn: str) -> str:
    """``transformer.h.2.ln_1`` -> ``transformer.h[2].ln_1``."""
    out = []
    for part in fqn.split("."):
        if part.isdigit():
            out.append(f"[{part}]")
        elif part.isidentifier() and not keyword.iskeyword(part):
            out.append(f".{part}")
        else:
            out.append(f"[{part!r}]")
    return "".join(out).lstrip(".")


def _comment(node: fx.Node) -> str:
    kind = node.meta.get("ppc.kind")
    if kind == "tensor":
        return "  # " + describe(node.meta)
    if kind == "tuple":
        return "  # tuple of tensors"
    return ""


def _fqn_range(ctx: CompileContext, sg: StageGraph) -> str:
    first_last = sg.modules or sg.node_names
    return f"{first_last[0]} .. {first_last[-1]}" if first_last else "(empty)"


def stage_class_name(stage: int) -> str:
    return f"Stage{stage}"


def generate_stage(ctx: CompileContext, sg: StageGraph, version: str) -> str:
    K = ctx.num_stages
    emitter = _Emitter(sg.graph)
    regions = _regions(sg.graph)
    body, methods = [], []
    for name in _mutated_receives(ctx, sg):
        var = emitter.names[name]
        # The runtime hands a received tensor to autograd as a leaf, and a leaf cannot change in place.
        body.append(f"{var} = {var}.clone()  # changed in place below")
    statements = []
    for node in sg.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        region = node.meta.get("ppc.checkpoint")
        if region is None:
            statements.append(_node_statement(emitter, node))
        elif node is regions[region][-1]:
            # The recomputing method enters the nodes' regions itself, in forward and again in backward.
            call, method, inputs, outputs = _checkpoint_region(ctx, emitter, region, regions[region])
            statements.append((call, outputs, inputs, ()))
            methods.append(method)
    body.extend(_freeing_after_last_use(emitter, statements))
    params = [emitter.names[n] for n in sg.graph_inputs + sg.receives + sg.sizes]
    # A sent buffer is copied: the rank's sender reads it after the next micro-batch may have
    # changed it (a step counter forward advances, sent as it is).
    state_sent = sorted(_state_sent(ctx, sg))
    returns = [f'"{n}": {emitter.names[n]}' + (".clone()" if n in state_sent else "") for n in sg.sends]
    copies_note = (
        [f"        # {', '.join(state_sent)}: a buffer the next micro-batch changes, sent as a copy"]
        if state_sent
        else []
    )
    output = next(n for n in sg.graph.nodes if n.op == "output")
    if sg.returns_loss:
        returns.append(f'"loss": {emitter.value(output.args[0]["loss"])}')
    if sg.returns_output:
        returns.append(f'"output": {emitter.value(output.args[0]["output"])}')

    port_lines = []
    for name in sg.graph_inputs:
        node = next(n for n in sg.graph.nodes if n.name == name)
        port_lines.append(f"            {name}: {describe(node.meta)}, model input (loaded on this rank)")
    for name in sg.receives:
        b = ctx.boundaries[name]
        port_lines.append(f"            {name}: {describe_boundary(b)}, received from stage {b.producer}")
    for name in sg.sizes:
        node = next(n for n in sg.graph.nodes if n.name == name)
        known = node.meta["ppc.value"]
        whence = "the same at every size" if known.kind == "constant" else "from the micro-batch's sizes"
        port_lines.append(
            f"            {name}: {known.text()}, {whence}, not sent (stage {node.meta['ppc.stage']} makes it)"
        )
    send_lines = []
    for name in sg.sends:
        b = ctx.boundaries[name]
        peers = ", ".join(str(c) for c in b.consumers)
        send_lines.append(
            f"            {name}: {describe_boundary(b)}, sent to stage{'s' if len(b.consumers) > 1 else ''} {peers}"
        )
    if sg.returns_loss:
        send_lines.append("            loss: [] float32, the training loss (this stage owns it)")
    if sg.returns_output:
        send_lines.append("            output: what the model's forward returns (inference):")
        send_lines += [
            f"                {path}: {_describe_leaf(leaf)}"
            for path, leaf in output_leaves(output.args[0]["output"])
        ]

    lines = [
        f'"""Stage {sg.stage} of {K} (rank {ctx.rank_of(sg.stage)}): {_fqn_range(ctx, sg)}.',
        "",
        f"Generated by ppcompile {version} from {ctx.ref}; do not edit, recompile instead.",
        '"""',
        "",
    ]
    lines += [f"import {m}" for m in sorted(emitter.imports)]
    lines += [
        "",
        "from ppcompile.runtime.stage import StageModule",
        "",
        "",
        f"class {stage_class_name(sg.stage)}(StageModule):",
        "    # Leaf submodules and tensors this stage holds, under the model's own names.",
        "    MODULES = " + _tuple_literal(sg.modules),
        "    TENSORS = " + _tuple_literal(sg.tensors),
        *(["    FUNCTIONS = " + _tuple_literal(emitter.functions)] if emitter.functions else []),
        "",
        f"    def forward(self, {', '.join(params)}):" if params else "    def forward(self):",
        '        """',
        "        Inputs:",
        *port_lines,
        "        Outputs:",
        *send_lines,
        '        """',
        *("        " + line for line in body),
        *copies_note,
        "        return {" + ", ".join(returns) + "}",
        "",
    ]
    for method in methods:
        lines += method + [""]
    return "\n".join(lines)


def _mutated_receives(ctx, sg: StageGraph) -> list[str]:
    """Received tensors that need a gradient and that an in-place op of this stage writes to."""
    modules = ctx.spec.module
    mutated = []
    for node in sg.graph.nodes:
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or first.op != "placeholder" or first.name not in sg.receives:
            continue
        in_place = is_in_place(modules, node)
        if in_place and ctx.boundaries[first.name].requires_grad and first.name not in mutated:
            mutated.append(first.name)
    return mutated


def _state_sent(ctx, sg: StageGraph) -> set[str]:
    """Sent tensors that are a buffer this stage writes (in place, or through a layer's call), or a
    view of one: forward writes it again at the next micro-batch."""
    modules = ctx.spec.module
    written = {name for node in sg.graph.nodes for name in written_buffers(modules, node)}
    state = set()
    for node in sg.graph.nodes:
        if node.name in sg.sends:
            root = storage_of(modules, node)
            if root.op == "get_attr" and root.target in written:
                state.add(node.name)
    return state


def _node_lines(emitter: _Emitter, node: fx.Node) -> list[str]:
    name = emitter.names[node.name]
    if node.op == "call_function" and node.target in _INPLACE and not node.kwargs:
        a, b = node.args
        return [
            f"{emitter.value(a)} {_INPLACE[node.target]} {emitter.value(b)}",
            f"{name} = {emitter.value(a)}{_comment(node)}",
        ]
    if node.op == "call_function" and node.target is assign_items:
        x, index, value = node.args
        return [
            f"{emitter.value(x)}[{emitter.value(index, in_index=True)}] = {emitter.value(value)}",
            f"{name} = {emitter.value(x)}{_comment(node)}",
        ]
    if node.op == "call_function" and node.target is rebind_buffer:
        fqn, value = node.args
        return [f"self.{attribute_path(fqn)} = {emitter.value(value)}  # the model rebinds its buffer"]
    return [f"{name} = {emitter.expression(node)}{_comment(node)}"]


def _node_statement(emitter: _Emitter, node: fx.Node) -> tuple:
    """A node's lines, what they define and read, and the regions (``torch.no_grad()``,
    ``torch.autocast(...)``) they run inside."""
    return _node_lines(emitter, node), [node], node.all_input_nodes, node.meta.get("ppc.regions", ())


def _freeing_after_last_use(emitter: _Emitter, statements: list[tuple], kept=()) -> list[str]:
    """The statements' lines, each (lines, the values it defines, the values it reads, the
    regions it runs inside), with a ``del`` after the last statement that reads a tensor value it
    defines, and a ``with torch.no_grad():`` or ``with torch.autocast(...):`` block around each run of
    statements inside the same region, as the model's forward has it.

    A local name keeps its tensor alive until the function returns: without the ``del`` every
    intermediate of the stage (attention scores before softmax, say) would be held through the
    whole forward. Values in ``kept`` (returned) stay; the inputs and the module's own tensors
    are held by the caller and the module anyway.
    """
    last_read: dict[fx.Node, int] = {}
    for index, (_, defined, read, _) in enumerate(statements):
        for node in defined:
            last_read[node] = index  # a value never read is dropped at once
        for node in read:
            if node in last_read:  # the caller's values (arguments) are the caller's to free
                last_read[node] = index
    freed: dict[int, list[str]] = {}
    for node, index in last_read.items():
        if node.op == "get_attr" or node in kept:
            continue
        if node.meta.get("ppc.kind") not in ("tensor", "tuple"):
            continue  # sizes, devices and dtypes hold no memory
        if any(user.op == "output" for user in node.users):
            continue
        freed.setdefault(index, []).append(emitter.names[node.name])
    lines, open_regions = [], ()
    for index, (statement, _, _, regions) in enumerate(statements):
        same = 0  # the regions still open that this statement runs inside too
        while same < min(len(open_regions), len(regions)) and open_regions[same] == regions[same]:
            same += 1
        for depth in range(same, len(regions)):
            lines.append("    " * depth + f"with {regions[depth].code()}:  # as the model's forward")
        open_regions = regions
        indent = "    " * len(regions)
        lines += [indent + line for line in statement]
        if index in freed:
            lines.append(indent + "del " + ", ".join(freed[index]))
    return lines


def _regions(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    regions: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        # A value received from the stage before keeps the region of the node that made it there,
        # where a cut falls inside a recomputed region: it is an input of the region here.
        if node.meta.get("ppc.checkpoint") is not None and node.op != "placeholder":
            regions.setdefault(node.meta["ppc.checkpoint"], []).append(node)
    return regions


def _checkpoint_region(
    ctx, emitter: _Emitter, region: str, nodes: list[fx.Node]
) -> tuple[list[str], list[str], list[fx.Node], list[fx.Node]]:
    """The forward's call of a recomputed region, the method that computes it, and the values the
    region reads from the forward and gives back to it."""
    inside = set(nodes)
    inputs = []
    for node in nodes:
        for dep in node.all_input_nodes:
            if dep not in inside and dep not in inputs:
                inputs.append(dep)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    method_name = "_recompute_" + re.sub(r"\W", "_", region)
    args = ", ".join(emitter.names[n.name] for n in inputs)
    results = ", ".join(emitter.names[n.name] for n in outputs)
    returned = results if len(outputs) == 1 else f"({results})" if outputs else "None"
    info = next((r for r in ctx.regions if r.name == region), None)
    why = ""
    if info is not None:
        why = f" (frees {info.saved_bytes / 2**20:.1f} MiB per micro-batch for {info.recompute_seconds * 1e3:.2f} ms)"
    emitter.imports.add("torch.utils.checkpoint")
    call = [f"# {region} is recomputed in backward{why}"]
    context = ""
    updating = sorted({n.target for n in nodes if updates_own_buffers(n)})
    if updating:
        # A BatchNorm's running statistics: the recomputation must not update them a second time.
        emitter.imports.add("ppcompile.runtime.recompute")
        modules = ", ".join(f"self.{attribute_path(target)}" for target in updating)
        context = f", context_fn=lambda: ppcompile.runtime.recompute.buffers_as_in_forward({modules})"
        call.append(
            "# the recomputation gets the buffers forward updates as forward found them, and leaves them be"
        )
    call.append(
        f"{results} = torch.utils.checkpoint.checkpoint(self.{method_name}, {args}, use_reentrant=False{context})"
    )
    if len(outputs) == 1 and outputs[0].meta.get("ppc.kind") == "tensor":
        call[-1] += _comment(outputs[0])
    statements = [_node_statement(emitter, n) for n in nodes]
    # A copy of each input the region writes in place: its second run must start from what forward read.
    copies = [
        f"{emitter.names[n.name]} = {emitter.names[n.name]}.clone()  # a copy: changed in place below, and recomputed from what forward read"
        for n in inputs_written(ctx.spec.module, nodes)
    ]
    method = [
        f"    def {method_name}(self, {args}):",
        f'        """{region}: run in forward without saving activations, and again in backward."""',
        *("        " + line for line in copies),
        *("        " + line for line in _freeing_after_last_use(emitter, statements, kept=outputs)),
        f"        return {returned}",
    ]
    return call, method, inputs, outputs


def _tuple_literal(items: list[str]) -> str:
    if not items:
        return "()"
    return "(\n" + "".join(f"        {item!r},\n" for item in items) + "    )"


def describe_boundary(b) -> str:
    return f"{format_shape(b.shape)} {format_dtype(b.dtype)}"


def shape_text(shape) -> list[str]:
    return [str(sympy.sympify(d)) for d in shape]
