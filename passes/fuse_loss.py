"""Fuse a language model's last linear layer with its cross-entropy loss.

``F.cross_entropy(lm_head(x).view(-1, V), targets.view(-1))`` is where a GPT spends much of its
time and memory: the logits are tokens x vocabulary, autograd keeps their log-softmax for
backward, and backward walks them again. This pass replaces the linear, the flattening view and
the loss with one call to ``ppcompile.runtime.losses.linear_cross_entropy``, which computes the
same loss a block of rows at a time, with the gradients of x, the weight and the bias in the same
pass (see that module). The loss and the gradients are the same up to float rounding.

The fused call saves the gradients (x's size and the weight's) for backward instead of the
log-softmax (tokens x vocabulary) and x, so it is fused only where that is less: where a
micro-batch has at least as many tokens as the layer has input features. Matched:

- the linear: an ``nn.Linear`` module, or ``F.linear`` of parameters read with ``get_attr``;
- used only by the loss, directly when already 2-D or through a ``view``, ``reshape`` or
  ``flatten`` to (rows, V) (with a ``size`` of it that only that flattening reads);
- ``F.cross_entropy`` or an ``nn.CrossEntropyLoss`` module, with class-index targets, no class
  weights, no label smoothing and ``reduction="mean"`` (``ignore_index`` is kept).

Off by default, on with ``--fuse-loss`` (``CompileConfig.fuse_loss``): the loss sums run in
another order, so losses and gradients match eager's within float rounding, not bitwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ppcompile.context import CompileContext
from ppcompile.passes.propagate_shapes import propagate_shapes
from ppcompile.runtime.losses import linear_cross_entropy

_FLATTEN_METHODS = ("view", "reshape", "flatten")
_FLATTEN_FUNCTIONS = (torch.flatten, torch.reshape)
_DEFAULTS = {
    "weight": None,
    "size_average": None,
    "reduce": None,
    "reduction": "mean",
    "label_smoothing": 0.0,
}
_PARAMETERS = (
    "input",
    "target",
    "weight",
    "size_average",
    "ignore_index",
    "reduce",
    "reduction",
    "label_smoothing",
)


# How the note begins where --fuse-loss found no loss it fuses: the CLI repeats it as a warning.
NOTHING_FUSED = "--fuse-loss fused nothing"

_SHAPE_FUSED = (
    "it fuses F.cross_entropy (or nn.CrossEntropyLoss) of a linear layer's output, as it is or flattened "
    "to (rows, V) and read by nothing else, with class-index targets, no class weights, no label smoothing "
    "and reduction='mean'"
)


@dataclass(frozen=True)
class _LossMatch:
    loss: fx.Node
    linear: fx.Node
    x: fx.Node
    weight: str  # FQN
    bias: str | None  # FQN
    target: fx.Node
    ignore_index: int
    removable: tuple[fx.Node, ...]  # what the fused call makes dead, users first


def fuse_loss(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if not ctx.config.fuse_loss:
        return gm
    fused = []
    for node in list(gm.graph.nodes):
        match = _match(gm, node)
        if match is None:
            continue
        tokens = _rows(match.x)
        width = match.x.meta["ppc.concrete"][-1]
        if width > tokens:
            ctx.notes.append(
                f"loss not fused with `{_linear_name(match)}`: a micro-batch has {tokens} rows of logits, fewer "
                f"than the layer's {width} input features, so its saved gradients would outweigh the logits"
            )
            continue
        _replace(gm, match)
        fused.append(match)
    if not fused:
        if not any(n.startswith("loss not fused with") for n in ctx.notes):
            ctx.notes.append(f"{NOTHING_FUSED}: {_why_nothing_matched(gm)}")
        return gm
    gm.graph.lint()
    gm.recompile()
    for match in fused:
        vocabulary = match.linear.meta["ppc.concrete"][-1]
        ctx.fused_losses.append(_linear_name(match))
        ctx.notes.append(
            f"loss fused with `{_linear_name(match)}` (--fuse-loss): linear_cross_entropy computes the loss and "
            f"its gradients in blocks of rows, never holding the {_rows(match.x)} x {vocabulary} logits"
        )
    # The fused call and the parameters it reads are new nodes: give them shapes too.
    return propagate_shapes(gm, ctx)


def _loss_parameters(gm: fx.GraphModule, loss: fx.Node) -> dict | None:
    """``F.cross_entropy``'s arguments by name, for a call of it or of an ``nn.CrossEntropyLoss``."""
    if loss.op == "call_function" and loss.target is F.cross_entropy:
        return dict(zip(_PARAMETERS, loss.args)) | dict(loss.kwargs)
    if loss.op == "call_module" and type(gm.get_submodule(loss.target)) is nn.CrossEntropyLoss:
        module = gm.get_submodule(loss.target)
        params = dict(zip(("input", "target"), loss.args)) | dict(loss.kwargs)
        weight = None if module.weight is None else "weight"  # any weight at all is unsupported
        return params | {
            "weight": weight,
            "ignore_index": module.ignore_index,
            "reduction": module.reduction,
            "label_smoothing": module.label_smoothing,
        }
    return None


def _match(gm: fx.GraphModule, loss: fx.Node) -> _LossMatch | None:
    params = _loss_parameters(gm, loss)
    if params is None or any(params.get(name, default) != default for name, default in _DEFAULTS.items()):
        return None
    logits, target = params.get("input"), params.get("target")
    ignore_index = params.get("ignore_index", -100)
    if (
        not isinstance(logits, fx.Node)
        or not isinstance(target, fx.Node)
        or not isinstance(ignore_index, int)
    ):
        return None
    if target.meta.get("ppc.dtype") not in (torch.int64, torch.int32):
        return None  # class probabilities, not indices
    removable = [logits]
    if (logits.op == "call_method" and logits.target in _FLATTEN_METHODS) or (
        logits.op == "call_function" and logits.target in _FLATTEN_FUNCTIONS
    ):
        flat, linear = logits, logits.args[0]
        if len(flat.users) != 1 or not isinstance(linear, fx.Node) or not _flattens_rows(flat, linear):
            return None
    else:
        linear = logits
    if not isinstance(linear, fx.Node) or len(logits.meta.get("ppc.concrete", ())) != 2:
        return None
    found = linear_call(gm, linear)
    if found is None:
        return None
    x, weight, bias = found
    # The linear may feed only the flattening (and a size that only the flattening reads).
    others = [u for u in linear.users if u is not logits and u is not loss]
    if any(u.op != "call_method" or u.target != "size" or set(u.users) - {logits} for u in others):
        return None
    if x.meta.get("ppc.concrete") is None:
        return None
    if linear is not logits:
        removable += others + [linear]
    return _LossMatch(loss, linear, x, weight, bias, target, ignore_index, tuple(removable))


def _why_nothing_matched(gm: fx.GraphModule) -> str:
    """Why the first cross-entropy of the graph is not fused, or that there is none; with what
    would be."""
    loss = next((n for n in gm.graph.nodes if _loss_parameters(gm, n) is not None), None)
    if loss is None:
        return f"the model computes no cross-entropy; {_SHAPE_FUSED}"
    params = _loss_parameters(gm, loss)
    changed = [
        f"{name}={params[name]!r}"
        for name, default in _DEFAULTS.items()
        if params.get(name, default) != default
    ]
    logits, target = params.get("input"), params.get("target")
    if changed:
        why = f"`{loss.name}` is called with {', '.join(changed)}"
    elif isinstance(target, fx.Node) and target.meta.get("ppc.dtype") not in (torch.int64, torch.int32):
        why = f"`{loss.name}` takes class probabilities as targets"
    elif not isinstance(logits, fx.Node):
        why = f"`{loss.name}` takes no graph value as its input"
    else:
        flattened = (logits.op == "call_method" and logits.target in _FLATTEN_METHODS) or (
            logits.op == "call_function" and logits.target in _FLATTEN_FUNCTIONS
        )
        source = logits.args[0] if flattened and isinstance(logits.args[0], fx.Node) else logits
        others = [u.name for u in source.users if u is not logits and u is not loss]
        if linear_call(gm, source) is None:
            why = f"`{loss.name}` takes `{source.name}` ({_made_by(source)}){' flattened' if flattened else ''}, not a linear layer's output"
        else:
            why = f"the output of `{source.name}` is read by more than the loss ({', '.join(others)})"
    return f"{why}; {_SHAPE_FUSED}"


def _made_by(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"made by a {type(node.graph.owning_module.get_submodule(node.target)).__name__}"
    if node.op == "call_method":
        return f"made by .{node.target}()"
    if node.op == "call_function":
        return f"made by {getattr(node.target, '__name__', node.target)}"
    return "an input" if node.op == "placeholder" else node.op


def _flattens_rows(flat: fx.Node, linear: fx.Node) -> bool:
    """Whether ``flat`` is ``linear``'s output as (rows, V): every leading dim flattened, in order
    (a view, reshape or flatten that keeps the last dim and makes one of the rest)."""
    shape, flat_shape = linear.meta.get("ppc.concrete"), flat.meta.get("ppc.concrete")
    if shape is None or flat_shape is None or len(flat_shape) != 2:
        return False
    return flat_shape == (math.prod(shape[:-1]), shape[-1])


def _has_hooks(module: nn.Module) -> bool:
    """Hooks on the module (``register_forward_hook``, the pre-hook of the old
    ``nn.utils.weight_norm``): they run only where the module itself is called."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def linear_call(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str, str | None] | None:
    """(input, weight FQN, bias FQN or None) of an nn.Linear call or an F.linear of get_attr nodes;
    None for any other node (divide_layers matches its layers with this too)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is not nn.Linear or _has_hooks(module) or len(node.args) != 1 or node.kwargs:
            return None
        bias = f"{node.target}.bias" if module.bias is not None else None
        return node.args[0], f"{node.target}.weight", bias
    if node.op == "call_function" and node.target is F.linear:
        params = dict(zip(("input", "weight", "bias"), node.args)) | dict(node.kwargs)
        weight, bias = params.get("weight"), params.get("bias")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return None
        if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
            return None
        return params["input"], weight.target, None if bias is None else bias.target
    return None


def _replace(gm: fx.GraphModule, match: _LossMatch) -> None:
    graph = gm.graph
    with graph.inserting_before(match.loss):
        weight = graph.get_attr(match.weight)
        bias = None if match.bias is None else graph.get_attr(match.bias)
        fused = graph.call_function(
            linear_cross_entropy, (match.x, weight, bias, match.target), {"ignore_index": match.ignore_index}
        )
    if "ppc.regions" in match.linear.meta:  # the head's regions (torch.autocast), for the fused call too
        fused.meta["ppc.regions"] = match.linear.meta["ppc.regions"]
    match.loss.replace_all_uses_with(fused)
    graph.erase_node(match.loss)
    read = [n for n in match.linear.all_input_nodes if n.op == "get_attr"]  # F.linear's parameters
    for node in (*match.removable, *read):
        if not node.users:
            graph.erase_node(node)


def _rows(x: fx.Node) -> int:
    return math.prod(x.meta["ppc.concrete"][:-1])


def _linear_name(match: _LossMatch) -> str:
    return match.linear.target if match.linear.op == "call_module" else match.weight
