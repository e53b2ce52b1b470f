"""Cost estimation: FLOPs, bytes and saved activations per node, and a roofline time.

Each node is run alone on meta tensors (nothing is allocated) under
``FlopCounterMode`` for its forward, then its backward, with
``saved_tensors_hooks`` recording what autograd keeps for backward. A saved tensor
is attributed to the value it shares storage with: one of the node's inputs, its own
output, a parameter (not an activation), or a temporary made inside the op. The
partitioner can then count a tensor saved by several consumers once per stage.

Identical nodes (same operator, argument shapes and module configuration) are costed
once: the 96 blocks of GPT-3 cost as much to estimate as one.

A node that returns a tuple (``nn.LSTM``'s ``(output, (h, c))``) and keeps some of its
outputs for backward keeps the tensors its ``getitem`` users take out: those are the graph
values that hold them, so an output kept by the node and read by a later node counts once.

Keys written on each node:
  ppc.cost     NodeCost
  ppc.view_of  the input whose storage this node's output shares (views), else None
  ppc.device_specific  whether what it saves or views differs on a real device from meta
  ppc.writes_buffers   whether its forward updates a model buffer in place (BatchNorm's running
                       statistics in training, ``self.steps.add_(1)``): running it twice, as
                       recomputation in backward does, would update the buffer twice
  ppc.writes_input  whether a model's own ``torch.autograd.Function`` writes its first argument in
                    place (``ctx.mark_dirty``, as InPlace-ABN does), which no node shows:
                    ``order_mutations.is_in_place`` reads it
  ppc.dim_order  a tensor whose memory is dense but not in its dims' order (``a.transpose(1, 2) +
                 b`` takes the transposed layout): its dims outermost first in memory, as CPU
                 kernels lay it out (:func:`device_layouts`); else (). A send keeps that layout,
                 so the consumer's kernels (a BatchNorm's reduction) sum in the order eager's do
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ppcompile.context import CompileContext
from ppcompile.passes.propagate_shapes import autocast_on_cpu, masks_without_values, run_fake_cpu, run_meta
from ppcompile.runtime.executor import held_storages
from ppcompile.tracer import (
    as_meta,
    autograd_function,
    has_autocast,
    is_effect,
    on_fake_cpu,
    rebind_buffer,
    under_regions,
)


@dataclass(frozen=True)
class NodeCost:
    forward_flops: float
    backward_flops: float
    bytes_moved: float  # inputs + outputs + parameters read, forward
    param_bytes: float  # parameters owned by a call_module node
    saved_inputs: tuple[str, ...]  # names of input values kept for backward (may include the node itself)
    saved_temp_bytes: float  # bytes kept for backward that belong to no graph value
    forward_time: float  # seconds on the device profile
    backward_time: float
    # Backward's memory traffic in multiples of bytes_moved: a layer with parameters moves about
    # bytes_moved once per gradient it computes (its input's, its weights'), so a frozen layer, or
    # the first layer fed by data, moves it once; any other op is taken to move it twice.
    backward_traffic: float = 2.0

    @property
    def time(self) -> float:
        return self.forward_time + self.backward_time


ZERO = NodeCost(0.0, 0.0, 0.0, 0.0, (), 0.0, 0.0, 0.0)


def estimate_costs(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    values = run_meta(gm, ctx, ctx.symbol_values)
    device_values = run_fake_cpu(gm, ctx, ctx.symbol_values)
    layouts = device_layouts(gm, ctx, device_values)
    cache: dict[tuple, tuple] = {}
    buffers = {StorageWeakRef(b.untyped_storage()) for b in gm.buffers()}
    for node in gm.graph.nodes:
        node.meta["ppc.view_of"] = None
        node.meta["ppc.writes_buffers"] = writes_buffers(gm, node, values, buffers)
        node.meta["ppc.writes_input"] = writes_its_input(node, values)
        node.meta["ppc.dim_order"] = memory_order(layouts.get(node.name))
        if costs_nothing(node):
            node.meta["ppc.cost"] = ZERO
            continue
        key = (
            _signature(gm, node, values),
            _signature(gm, node, device_values),
            node.meta.get("ppc.regions"),
        )
        if key not in cache:
            cache[key] = _measure(gm, node, values, device_values, ctx)
        fwd_flops, bwd_flops, saved_args, saved_self, temp_bytes, view_of, param_bytes, on_device = cache[key]
        node.meta["ppc.device_specific"] = on_device
        input_nodes = _arg_nodes(node)
        is_view = view_of is not None
        # A view shares its input's storage: memory accounting counts the storage once.
        node.meta["ppc.view_of"] = input_nodes[view_of].name if is_view else None
        if _takes_from_view_tuple(node):
            # q, k, v = qkv.chunk(3): each item shares the storage of what was chunked.
            node.meta["ppc.view_of"], is_view = node.args[0].name, True
        saved = [input_nodes[i].name for i in saved_args if input_nodes[i].op != "get_attr"]
        if saved_self and node.meta["ppc.kind"] == "tuple":
            held, unheld = _kept_items(node, values.get(node.name), saved_self)
            saved += held
            temp_bytes += unheld
        elif saved_self:
            saved.append(node.name)
        # Bytes moved count tensors only, as fit_cost_formulas counts them: a tuple is its items.
        input_bytes = sum(
            n.meta.get("ppc.nbytes", 0) for n in input_nodes if n.meta.get("ppc.kind") == "tensor"
        )
        output_bytes = node.meta.get("ppc.nbytes", 0) if node.meta["ppc.kind"] == "tensor" else 0
        # A view (transpose, split, reshape of contiguous data) moves no bytes.
        moved = 0 if is_view else input_bytes + output_bytes + param_bytes
        # A tuple (an LSTM's, an attention's) is differentiable where an item read from it is: not
        # in a frozen layer fed by frozen ones, nor for inference.
        differentiable = bool(node.meta.get("ppc.requires_grad")) or (
            node.meta["ppc.kind"] == "tuple"
            and any(u.meta.get("ppc.requires_grad", True) for u in node.users)
        )
        traffic = backward_traffic(gm, node, values)
        dtype = node.meta.get("ppc.dtype", torch.float32)
        profile = ctx.profile
        node.meta["ppc.cost"] = NodeCost(
            forward_flops=fwd_flops,
            backward_flops=bwd_flops,
            bytes_moved=moved,
            param_bytes=param_bytes,
            saved_inputs=tuple(dict.fromkeys(saved)),
            saved_temp_bytes=temp_bytes,
            forward_time=profile.compute_time(fwd_flops, moved, dtype),
            backward_time=profile.compute_time(bwd_flops, traffic * moved, dtype) if differentiable else 0.0,
            backward_traffic=traffic,
        )
    return gm


def backward_traffic(gm: fx.GraphModule, node: fx.Node, values: dict) -> float:
    """``NodeCost.backward_traffic`` of ``node``: for a layer with parameters (a module's, or
    tensors read with ``get_attr``: weights, and buffers such as a mask, which take no gradient),
    1 for each gradient its backward computes, the input's and the weights'; 2 for any other op."""
    if node.op == "call_module":
        params = list(gm.get_submodule(node.target).parameters())
    else:
        params = [values.get(n.name) for n in node.all_input_nodes if n.op == "get_attr"]
    params = [p for p in params if isinstance(p, torch.Tensor)]
    if not params:
        return 2.0
    input_grad = any(n.op != "get_attr" and n.meta.get("ppc.requires_grad") for n in node.all_input_nodes)
    weight_grad = any(p.requires_grad for p in params)
    return float(input_grad + weight_grad)


def costs_nothing(node: fx.Node) -> bool:
    """Inputs, attributes, Python values (sizes, dtypes) and effects (a buffer's rebinding):
    nothing to time or count, and an effect must not run alone."""
    return (
        node.op not in ("call_function", "call_method", "call_module")
        or node.meta["ppc.kind"] == "other"
        or is_effect(node)
    )


def _kept_items(node: fx.Node, value, paths: tuple) -> tuple[list[str], float]:
    """The items of tuple ``node`` at ``paths`` (``(0,)``, ``(1, 0)``) that backward keeps: (the
    getitem nodes that hold them, bytes of those no graph value holds)."""
    holders = {}
    stack = [(node, ())]
    while stack:
        parent, path = stack.pop()
        for user in parent.users:
            if user.target is operator.getitem and user.args[0] is parent and isinstance(user.args[1], int):
                holders[(*path, user.args[1])] = user
                stack.append((user, (*path, user.args[1])))
    names, unheld = [], 0.0
    for path in paths:
        if path in holders:
            names.append(holders[path].name)
            continue
        item = value
        for index in path:
            item = item[index]
        unheld += item.numel() * item.element_size()
    return names, unheld


class _BufferWrites(TorchDispatchMode):
    """The storages the operations run under it write: arguments their schema marks as written
    (``Tensor(a!)``), and the running statistics batch norm updates in training, which
    ``native_batch_norm``'s schema does not mark."""

    def __init__(self):
        super().__init__()
        self.written: set[StorageWeakRef] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema.arguments
        given = {a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(schema)}
        for a in schema:
            statistic = a.name in ("running_mean", "running_var") and given.get("training") is True
            if (a.alias_info is not None and a.alias_info.is_write) or statistic:
                values = given[a.name] if isinstance(given[a.name], (list, tuple)) else [given[a.name]]
                self.written.update(
                    StorageWeakRef(v.untyped_storage()) for v in values if isinstance(v, torch.Tensor)
                )
        return func(*args, **kwargs)


def writes_buffers(gm: fx.GraphModule, node: fx.Node, values: dict, buffers: set) -> bool:
    """Whether running ``node`` writes into a model buffer (``buffers``: their storages), found by
    running it once more on meta tensors. Only a leaf module holding buffers or a node reading one
    (or a view of one) can."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_function" and node.target is rebind_buffer:  # self.ema = ... in forward
        return True
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    reads = {
        StorageWeakRef(v.untyped_storage())
        for v in (values.get(n.name) for n in node.all_input_nodes)
        if isinstance(v, torch.Tensor)
    }
    if not (reads & buffers) and not (module is not None and any(True for _ in module.buffers())):
        return False
    args = fx.node.map_arg(node.args, lambda n: values.get(n.name))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values.get(n.name))
    recorder = _BufferWrites()
    try:
        with torch.device("meta"), torch.no_grad(), recorder:
            call_node(gm, node, module, args, kwargs)
    except Exception:  # noqa: BLE001 - an op meta cannot run; a module with buffers may write them
        return module is not None
    owned = {StorageWeakRef(b.untyped_storage()) for b in module.buffers()} if module is not None else set()
    return bool(recorder.written & (buffers | owned))


def writes_its_input(node: fx.Node, values: dict) -> bool:
    """Whether ``node``, a model's own ``torch.autograd.Function``, writes its first argument in
    place, found by running it on meta copies of its arguments."""
    first = node.args[0] if node.args else None
    if node.op != "call_function" or autograd_function(node.target) is None or not isinstance(first, fx.Node):
        return False

    def copied(n: fx.Node):
        value = values.get(n.name)
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    args, kwargs = fx.node.map_arg(node.args, copied), fx.node.map_arg(node.kwargs, copied)
    if not isinstance(args[0], torch.Tensor):
        return False
    recorder = _BufferWrites()
    try:
        with torch.device("meta"), torch.no_grad(), recorder:
            node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op meta cannot run: as traced, a call like any other
        return False
    return StorageWeakRef(args[0].untyped_storage()) in recorder.written


def device_layouts(gm: fx.GraphModule, ctx: CompileContext, device_values: dict) -> dict[str, object]:
    """Every node's value as CPU kernels lay it out, as meta tensors of those strides (non-tensor
    values as ``device_values`` has them). Fake tensors take their layouts from decompositions,
    which differ from the kernels': BatchNorm's output is laid out like its input on fake tensors,
    contiguous on CPU. So each node runs for real on zeros laid out as its inputs came out, where
    its tensors fit in ``REAL_RUN_BYTES`` (identical nodes once); elsewhere, and where an op
    rejects zeros, its fake value's layout stands."""
    layouts: dict[str, object] = {}
    cache: dict[tuple, object] = {}
    runs_as = autocast_on_cpu(ctx)
    for node in gm.graph.nodes:
        fake = device_values.get(node.name)
        input_nodes = _arg_nodes(node)
        inputs = [layouts.get(n.name) for n in input_nodes]
        touched = sum(t.numel() * t.element_size() for t in [*inputs, fake] if isinstance(t, torch.Tensor))
        if costs_nothing(node) or touched > REAL_RUN_BYTES or not _holds_tensor(fake):
            layouts[node.name] = as_meta(fake)
            continue
        key = (_signature(gm, node, layouts), node.meta.get("ppc.regions"))
        if key not in cache:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            try:
                cache[key] = as_meta(run_alone_on_cpu(gm, node, module, layouts, runs_as)[1])
            except Exception:  # noqa: BLE001 - an op that rejects zeros as data
                cache[key] = None
        layouts[node.name] = as_meta(fake) if cache[key] is None else cache[key]
    return layouts


def _holds_tensor(value) -> bool:
    return any(isinstance(v, torch.Tensor) for v in _flatten(value))


def memory_order(value) -> tuple[int, ...]:
    """The dims of a dense tensor not stored in their own order, outermost first in memory; ()
    for a contiguous tensor, one with gaps or overlaps (a slice, an expand), or no tensor.

    >>> memory_order(torch.zeros(2, 3, 4).transpose(1, 2))
    (0, 2, 1)
    """
    if not isinstance(value, torch.Tensor) or value.is_contiguous() or value.is_sparse:
        return ()
    # Ties (dims of size 1) keep their own order.
    order = tuple(sorted(range(value.dim()), key=lambda d: (-value.stride(d), d)))
    return order if value.permute(order).is_contiguous() else ()


def _takes_from_view_tuple(node: fx.Node) -> bool:
    """An item taken out of a tuple of views (chunk, split, unbind), which the tuple's node records."""
    source = node.args[0] if node.target is operator.getitem and node.args else None
    return isinstance(source, fx.Node) and source.meta.get("ppc.view_of") is not None


def runs_on_cpu(ctx: CompileContext) -> bool:
    """Whether the program is compiled for CPU ranks: then what a node saves for backward is
    taken from a real run on CPU where the node is small enough."""
    config = ctx.config
    return config.device_profile == "cpu" and (not config.profile or config.profile_device == "cpu")


def _arg_nodes(node: fx.Node) -> list[fx.Node]:
    """The node's tensor-carrying inputs in a fixed order (flattened args, then kwargs)."""
    return list(node.all_input_nodes)


def _signature(gm: fx.GraphModule, node: fx.Node, values: dict) -> tuple:
    def describe(a):
        if isinstance(a, fx.Node):
            v = values.get(a.name)
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), v.dtype, v.requires_grad, v.stride())
            return ("V", repr(v))
        return ("C", repr(a))

    # repr: slices are unhashable before Python 3.12.
    args = repr(fx.node.map_aggregate(node.args, describe))
    kwargs = repr(sorted((k, fx.node.map_aggregate(v, describe)) for k, v in node.kwargs.items()))
    inputs = tuple(describe(n) for n in node.all_input_nodes)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        # A frozen layer's backward computes no weight gradient: it is not a trained one's twin.
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters())
        target = (type(module).__qualname__, repr(module), params, module.training)
    else:
        target = node.target if node.op == "call_method" else id(node.target)
    return (node.op, target, args, kwargs, inputs)


# Nodes whose inputs, output and weights fit in this many bytes run for real when the program runs
# on CPU: only a real run shows what a kernel copies internally (CPU flash attention saves
# contiguous copies of non-contiguous q, k, v).
REAL_RUN_BYTES = 64 * 2**20


def _measure(
    gm: fx.GraphModule, node: fx.Node, values: dict, device_values: dict, ctx: CompileContext
) -> tuple:
    """Run one node alone: (fwd flops, bwd flops, saved input indices, saved self, temporary saved
    bytes, index of the input the output is a view of or None, parameter bytes, whether the last
    four differ from a run on meta).

    FLOPs are counted on meta tensors (``values``), where the flop counter knows every kernel.
    What is saved and what is a view comes from a run on CPU tensors laid out as CPU kernels lay
    them out (``device_values``): meta tensors pick other kernels than real devices do.
    scaled_dot_product_attention (and nn.MultiheadAttention, which calls it) falls back to the
    math path on meta and saves the B x H x T x T attention weights, where CPU and GPU kernels save
    the output and a log-sum-exp, in a (B, T, H, D) layout that makes the usual
    ``y.transpose(1, 2).reshape(B, T, C)`` a view. The run is real (zeros as data) when the program
    runs on CPU and the node is small, else on fake tensors."""
    input_nodes = _arg_nodes(node)
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0
    counted_module = module
    try:
        if has_autocast(node):
            counted_module, counted = _count_flops_under_autocast(gm, node, module, values, ctx)
        else:
            counted = _count_flops(gm, node, module, values, "meta")
    except Exception as e:
        if not _needs_real_tensors(e):
            raise
        # propagate_shapes ran every forward on meta, so this is a backward with no meta kernel
        # (F.multi_margin_loss's): counted on CPU zeros instead.
        counted_module = zeroed_cpu_copy(module)
        zeros = {n.name: zeros_laid_out(values.get(n.name)) for n in input_nodes}
        counted = _count_flops(gm, node, counted_module, zeros, "cpu")
    forward_flops, backward_flops, saved, inputs, out = counted

    tensors = [values.get(n.name) for n in [*input_nodes, node]]
    touched = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) + param_bytes
    real = runs_on_cpu(ctx) and touched <= REAL_RUN_BYTES
    held = held_storages([counted_module] if counted_module is not None else [])
    saved_on_meta = classify_saved(saved, inputs, out, held)
    runs_as = autocast_on_cpu(ctx)
    saved_on_device = _saved_on_device(gm, node, module, device_values, real, runs_as) or saved_on_meta
    return (forward_flops, backward_flops, *saved_on_device, param_bytes, saved_on_device != saved_on_meta)


def _needs_real_tensors(error: Exception) -> bool:
    """Whether ``error`` is a meta tensor asked for values it does not have, or an op with no meta
    kernel: what a run on real tensors does not meet."""
    text = str(error)
    return isinstance(error, DataDependentOutputException) or any(
        phrase in text
        for phrase in ("cannot be called on meta tensors", "Meta kernel", "register_meta", "data-dependent")
    )


def _count_flops_under_autocast(
    gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, values: dict, ctx
):
    """(the module counted, :func:`_count_flops`) for a node traced inside a ``torch.autocast``
    region: run under it on fake CPU tensors, since autocast leaves meta tensors alone (a linear's
    input is bfloat16 there, and its weight would not be cast to meet it)."""
    on_cpu = copy.deepcopy(module) if module is not None else None
    with FakeTensorMode(allow_non_fake_inputs=True):
        if on_cpu is not None:
            on_cpu.to_empty(device="cpu")
        fake = {n.name: on_fake_cpu(values.get(n.name)) for n in _arg_nodes(node)}
        with under_regions(node, autocast_on_cpu(ctx)):
            return on_cpu, _count_flops(gm, node, on_cpu, fake, "cpu")


def _count_flops(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, values: dict, device: str):
    """The node run alone on ``values`` (tensors on ``device``) under the flop counter: (forward
    FLOPs, backward FLOPs, the tensors autograd saved, the inputs it was given, its output)."""
    input_nodes = _arg_nodes(node)
    leaves, fresh = fresh_inputs(input_nodes, values)
    params = list(module.parameters()) if module is not None else []
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    args = fx.node.map_arg(node.args, lambda n: fresh[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: fresh[n.name])
    with torch.device(device), FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call_node(gm, node, module, args, kwargs)
    forward_flops = counter.get_total_flops()

    outputs = [o for o in _flatten(out) if isinstance(o, torch.Tensor) and o.requires_grad]
    wrt = [leaf for leaf in leaves.values() if leaf.requires_grad] + [p for p in params if p.requires_grad]
    backward_flops = 0
    if outputs and wrt:
        with torch.device(device), FlopCounterMode(display=False) as counter:
            torch.autograd.grad(outputs, wrt, [torch.ones_like(o) for o in outputs], allow_unused=True)
        backward_flops = counter.get_total_flops()
    return forward_flops, backward_flops, saved, [fresh[n.name] for n in input_nodes], out


def _saved_on_device(
    gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, values: dict, real: bool, runs_as: dict
):
    """``classify_saved`` of the node run on CPU tensors shaped and strided as ``values`` (under
    its grad-mode and autocast regions, ``runs_as`` as ``tracer.under_regions`` takes it): for real with
    ``real`` (zeros as data) where the op accepts zeros, else on fake tensors (nothing is
    allocated). None where an op cannot run on fake tensors (a data-dependent one)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    def run():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs, out, on_device = run_alone_on_cpu(gm, node, module, values, runs_as)
        return classify_saved(saved, inputs, out, held_storages([on_device] if on_device is not None else []))

    if real:
        try:
            return run()
        except Exception:  # noqa: BLE001 - an op that rejects zeros as data; try fake tensors
            saved.clear()
    try:
        with FakeTensorMode():
            return run()
    except Exception:  # noqa: BLE001 - a data-dependent op; the meta run's answer stands
        return None


def fresh_inputs(
    input_nodes: list[fx.Node], values: dict, detach_attributes: bool = True
) -> tuple[dict, dict]:
    """A node's inputs made anew for running it alone: ({name: leaf tensor}, {name: value to pass}).

    Each tensor becomes a leaf that requires grad as the original did, and what is passed is a
    non-leaf copy of it, so in-place ops are allowed (the copy is made before any counting starts).
    With ``detach_attributes`` off, parameters and buffers read through get_attr pass as they are."""
    leaves, fresh = {}, {}
    for n in input_nodes:
        v = values.get(n.name)
        if isinstance(v, torch.Tensor) and (detach_attributes or n.op != "get_attr"):
            leaf = v.detach().requires_grad_(v.requires_grad and v.is_floating_point())
            leaves[n.name] = leaf
            fresh[n.name] = leaf.clone() if leaf.requires_grad else leaf
        else:
            fresh[n.name] = v
    return leaves, fresh


def storage_indices(values: list) -> dict:
    """Storage of each tensor among ``values`` -> the index of the first value that uses it."""
    indices = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            indices.setdefault(StorageWeakRef(v.untyped_storage()), i)
    return indices


def classify_saved(saved: list[torch.Tensor], inputs: list, out, held_storages: set):
    """What autograd kept for backward, by owner: (indices of inputs kept, output kept, bytes of
    temporaries that belong to no graph value, index of the input the output is a view of or
    None). The output kept is given as the index paths of the kept tensors in it (``()`` for a
    tensor output, ``(1, 0)`` for ``h`` of ``(output, (h, c))``), empty when none is kept.
    Parameters and buffers (``held_storages``) are not activations and are left out."""
    input_storages = storage_indices(inputs)
    paths = _tensor_paths(out)
    outs = [o for _, o in paths]
    output_storages = {}
    for path, o in paths:
        output_storages.setdefault(StorageWeakRef(o.untyped_storage()), path)
    saved_args, saved_self, temp = set(), set(), {}
    for t in saved:
        ref = StorageWeakRef(t.untyped_storage())
        if ref in held_storages:
            continue
        if ref in input_storages:
            saved_args.add(input_storages[ref])
        elif ref in output_storages:
            saved_self.add(output_storages[ref])
        else:
            temp[ref] = t.untyped_storage().nbytes()
    views = [input_storages.get(StorageWeakRef(o.untyped_storage())) for o in outs]
    view_of = views[0] if outs and None not in views and len(set(views)) == 1 else None
    return tuple(sorted(saved_args)), tuple(sorted(saved_self)), float(sum(temp.values())), view_of


def _tensor_paths(value, path: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """(index path, tensor) of every tensor in a (nested) tuple; ``()`` for a tensor itself."""
    if isinstance(value, (tuple, list)):
        return [p for i, v in enumerate(value) for p in _tensor_paths(v, (*path, i))]
    return [(path, value)] if isinstance(value, torch.Tensor) else []


def run_alone_on_cpu(
    gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, values: dict, runs_as: dict
):
    """The node run alone on CPU zeros shaped and strided as its inputs' ``values`` (by node name),
    under its grad-mode and autocast regions (``runs_as`` as ``tracer.under_regions`` takes it):
    (its inputs, its output, its module's copy or None). The model was built on meta: the module
    runs as a CPU copy with zeros for weights. Under ``FakeTensorMode`` nothing is allocated."""
    on_device = zeroed_cpu_copy(module)
    input_nodes = list(node.all_input_nodes)
    inputs = [zeros_laid_out(values.get(n.name)) for n in input_nodes]
    by_name = dict(zip((n.name for n in input_nodes), inputs))
    args = fx.node.map_arg(node.args, lambda n: by_name[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: by_name[n.name])
    with under_regions(node, runs_as):
        return inputs, call_node(gm, node, on_device, args, kwargs), on_device


def zeroed_cpu_copy(module: nn.Module | None) -> nn.Module | None:
    """A copy of a module built on meta, on CPU with zeros for its weights and buffers."""
    if module is None:
        return None
    on_cpu = copy.deepcopy(module).to_empty(device="cpu")
    with torch.no_grad():
        for t in [*on_cpu.parameters(), *on_cpu.buffers()]:
            t.zero_()
    return on_cpu


def zeros_laid_out(value):
    """CPU zeros of a tensor's shape, strides and dtype (other values as they are); a non-leaf
    where it requires grad, so in-place ops are allowed."""
    if not isinstance(value, torch.Tensor):
        return value
    t = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu").zero_()
    t.requires_grad_(value.requires_grad and value.is_floating_point())
    return t.clone() if t.requires_grad else t


def call_node(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, args, kwargs):
    with masks_without_values():
        if node.op == "call_module":
            return module(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        return node.target(*args, **kwargs)


def _flatten(value) -> list:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    return [value]
