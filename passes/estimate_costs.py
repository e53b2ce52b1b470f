"""Cost estimation: FLOPs, bytes and saved activations per node, and a roofline time.

Each node is run alone on meta tensors (nothing is allocated) under
``FlopCounterMode`` for its forward, then its backward, with
``saved_tensors_hooks`` recording what autograd keeps for backward. A saved tensor
is attributed to the value it shares storage with: one of the node's inputs, its own
output, a parameter (not an activation), or a temporary made inside the op. The
partitioner can then count a tensor saved by several consumers once per stage.

Identical nodes (same operator, argument shapes and module configuration) are costed
once: the 96 blocks of GPT-3 cost as much to estimate as one.

Keys written on each node:
  ppc.cost     NodeCost
  ppc.view_of  the input whose storage this node's output shares (views), else None
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode

from ppcompile.context import CompileContext
from ppcompile.passes.propagate_shapes import run_meta


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

    @property
    def time(self) -> float:
        return self.forward_time + self.backward_time


ZERO = NodeCost(0.0, 0.0, 0.0, 0.0, (), 0.0, 0.0, 0.0)


def estimate_costs(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    values = run_meta(gm, ctx, ctx.symbol_values)
    cache: dict[tuple, tuple] = {}
    for node in gm.graph.nodes:
        node.meta["ppc.view_of"] = None
        if node.op not in ("call_function", "call_method", "call_module") or node.meta["ppc.kind"] == "other":
            node.meta["ppc.cost"] = ZERO
            continue
        key = _signature(gm, node, values)
        if key not in cache:
            cache[key] = _measure(gm, node, values)
        fwd_flops, bwd_flops, saved_args, saved_self, temp_bytes, param_bytes, view_of = cache[key]
        input_nodes = _arg_nodes(node)
        is_view = view_of is not None
        # A view shares its input's storage: memory accounting counts the storage once.
        node.meta["ppc.view_of"] = input_nodes[view_of].name if is_view else None
        saved = [input_nodes[i].name for i in saved_args if input_nodes[i].op != "get_attr"]
        if saved_self:
            saved.append(node.name)
        input_bytes = sum(n.meta.get("ppc.nbytes", 0) for n in input_nodes)
        # A view (transpose, split, reshape of contiguous data) moves no bytes.
        moved = 0 if is_view else input_bytes + node.meta.get("ppc.nbytes", 0) + param_bytes
        differentiable = bool(node.meta.get("ppc.requires_grad")) or node.meta["ppc.kind"] == "tuple"
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
            backward_time=profile.compute_time(bwd_flops, 2 * moved, dtype) if differentiable else 0.0,
        )
    return gm


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
        params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
        target = (type(module).__qualname__, repr(module), params, module.training)
    else:
        target = node.target if node.op == "call_method" else id(node.target)
    return (node.op, target, args, kwargs, inputs)


def _measure(gm: fx.GraphModule, node: fx.Node, values: dict) -> tuple:
    """Run one node alone on meta tensors: (fwd flops, bwd flops, saved input indices, saved self,
    temporary saved bytes, parameter bytes, index of the input the output is a view of or None)."""
    input_nodes = _arg_nodes(node)
    leaves, fresh = fresh_inputs(input_nodes, values)
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    params = list(module.parameters()) if module is not None else []
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    param_storages = {StorageWeakRef(p.untyped_storage()) for p in params}

    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    args = fx.node.map_arg(node.args, lambda n: fresh[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: fresh[n.name])
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _call(gm, node, module, args, kwargs)
    forward_flops = counter.get_total_flops()

    outputs = [o for o in _flatten(out) if isinstance(o, torch.Tensor) and o.requires_grad]
    wrt = [leaf for leaf in leaves.values() if leaf.requires_grad] + [p for p in params if p.requires_grad]
    backward_flops = 0
    if outputs and wrt:
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            torch.autograd.grad(outputs, wrt, [torch.ones_like(o) for o in outputs], allow_unused=True)
        backward_flops = counter.get_total_flops()

    input_storages = storage_indices([fresh[n.name] for n in input_nodes])
    saved_args, saved_self, temp_bytes = classify_saved(saved, input_storages, out, param_storages)
    outs = [o for o in _flatten(out) if isinstance(o, torch.Tensor)]
    views = [input_storages.get(StorageWeakRef(o.untyped_storage())) for o in outs]
    view_of = views[0] if outs and None not in views and len(set(views)) == 1 else None
    return (
        forward_flops,
        backward_flops,
        tuple(sorted(saved_args)),
        saved_self,
        temp_bytes,
        param_bytes,
        view_of,
    )


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


def classify_saved(saved: list[torch.Tensor], input_storages: dict, out, param_storages: set):
    """What autograd kept for backward, by owner: (indices of inputs kept, output kept, bytes of
    temporaries that belong to no graph value). Parameters are not activations and are left out."""
    output_storages = {
        StorageWeakRef(o.untyped_storage()) for o in _flatten(out) if isinstance(o, torch.Tensor)
    }
    saved_args, saved_self, temp = set(), False, {}
    for t in saved:
        ref = StorageWeakRef(t.untyped_storage())
        if ref in param_storages:
            continue
        if ref in input_storages:
            saved_args.add(input_storages[ref])
        elif ref in output_storages:
            saved_self = True
        else:
            temp[ref] = t.untyped_storage().nbytes()
    return saved_args, saved_self, float(sum(temp.values()))


def _call(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, args, kwargs):
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
