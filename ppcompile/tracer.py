"""The tracer: torch.fx's, extended to trace models as users write them.

Plain fx refuses or silently mistraces several things a model's forward often does; here each is
traced into the graph, or decided for the example inputs and listed for the report:

- control flow and ``range``/``int`` on shapes (``assert t <= block_size``, ``if x.dim() == 3``,
  ``for t in range(x.size(1))``): decided on meta tensors of the example's shapes;
- ``len(x)`` and ``torch.zeros(b, d)`` with a traced size: nodes of the graph, symbolic in ``b``;
- iterating a traced value (``x.reshape(*x.shape[:-1], -1, 2)``, ``for d in x.shape``, ``for
  part in x.split(4, 1)``): one indexed read per element, as many as the example's value has
  (a shape's rank; otherwise decided, as ``range``'s bounds are);
- ``x.dtype``: the example's dtype (``torch.finfo(x.dtype).min``);
- ``x[i] = v`` (``h[:, :2] = 0``, ``self.queue[0] = k``): an in-place node, :func:`assign_items`;
- a plain tensor attribute (``self.mask = torch.tril(...)`` in ``__init__``, not a buffer): read
  as a buffer is, so ``self.mask[:T, :T]`` traces;
- ``self.parameters()`` and ``self.named_parameters()`` called by the model's code (an L2 penalty
  in forward): the parameters as traced reads, so the penalty's gradient reaches them;
- a small tensor made from constants (``weight=torch.tensor([1.0, 2.0])``): a node that makes it
  again, where fx would hide it in an attribute no stage has;
- an input the example inputs leave at its default (``mask=None``): that value, a constant, so
  ``if mask is not None`` takes the branch eager would;
- ``torch.no_grad()`` and its kin, and ``torch.autocast(...)``: each node made inside one is
  marked with the regions it ran inside (``ppc.regions``: :class:`GradModeRegion`,
  :class:`AutocastRegion`), so a stage runs it under the same, wherever the cuts fall;
- a buffer given a new value (``self.steps += 1``): :func:`rebind_buffer`;
- ``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and ``nn.Transformer``: the loop over their
  layers that their forward is, each layer one node, so a cut may fall between two layers.
"""

from __future__ import annotations

import bisect
import builtins
import dataclasses
import dis
import functools
import inspect
import math
import operator
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import sympy
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from sympy.printing.pycode import pycode
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ppcompile.runtime.executor import decided_value
from ppcompile.runtime.masks import is_causal_mask
from ppcompile.runtime.spec import regrouped
from ppcompile.runtime.stage import plain_tensor_attributes

# nn.Module's own call and attribute lookup: while fx traces it swaps in versions that record
# calls and parameter reads as graph nodes, which running a submodule for a value must not do.
_MODULE_CALL = nn.Module.__call__
_MODULE_GETATTR = nn.Module.__getattr__
_MODULE_SETATTR = nn.Module.__setattr__
_NAMED_PARAMETERS = nn.Module.named_parameters
_PARAMETERS = nn.Module.parameters
_ABSENT = object()  # an attribute the module did not have
# Frames in these are not the model's code (ppcompile's own: this package).
LIBRARY_DIRS = (str(Path(torch.__file__).parent), str(Path(__file__).parent))


class PipelineTracer(fx.Tracer):
    """fx's tracer, with buffers proxied so ``self.mask[:, :T]`` traces like a parameter would, and
    Python values computed from shapes decided by the example inputs.

    ``assert t <= self.block_size``, ``if x.dim() == 4`` or ``for i in range(x.size(1))`` stop
    plain fx. Here the value is computed on meta tensors of the example inputs' shapes and the
    code that follows is traced with it (a loop over ``range(t)`` unrolled); ``decided`` lists
    each as (``file:line: `code```, value), for the report. ``len(x)`` becomes a node of the
    graph, and ``torch.no_grad()`` in forward a pair of grad-mode switches. A condition on a
    tensor's values (``if x.sum() > 0``) still cannot be traced: meta tensors have shapes, not
    values.
    """

    proxy_buffer_attributes = True

    def __init__(
        self,
        example_inputs: dict[str, object] | None = None,
        model_path: str | None = None,
        input_groups=(),
        trains: bool = True,
        device_type: str = "cpu",
        none_inputs=(),
    ):
        super().__init__()
        # forward's inputs the example gives as None: traced as None, as a default of None is.
        self.none_inputs = tuple(none_inputs)
        # The device type the program is compiled for: what torch.autocast(x.device.type) means
        # (traced on meta tensors, x.device is the meta device).
        self.device_type = device_type
        # False when compiling for inference, which runs without autograd: what only matters to
        # gradients (a reentrant checkpoint's) is not refused then.
        self.trains = trains
        self.example_inputs = {
            name: t.to("meta") if isinstance(t, torch.Tensor) else t
            for name, t in (example_inputs or {}).items()
        }
        # forward's inputs given as dicts, lists, tuples or named tuples of tensors: name -> (keys,
        # kind), as ModelSpec.input_groups records them.
        self.input_groups = {name: (keys, kind) for name, keys, kind in input_groups}
        self.model_path = model_path
        self.decided: list[tuple[str, bool | int]] = []
        self._decisions: list[tuple[fx.Node, object]] = []  # per decided: the node, and int, bool or len
        self.decided_formulas: list[dict] = []  # decision_formulas' answer, set by whoever asks it
        self._values: dict[fx.Node, object] = {}
        self._asked: set[fx.Node] = set()  # what decided values were computed from

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._grad_modes: list[bool] = []  # per open grad-mode region, the mode before it
        self._assigned: list[tuple[nn.Module, str, object]] = []  # plain attributes set, old values
        self._rebound: dict[int, fx.Proxy] = {}  # id of a buffer's tensor -> its new value
        self._regions: list[Region] = []  # the grad-mode and autocast regions open, outermost first
        self._installed = {id(m) for m in root.modules()} if isinstance(root, nn.Module) else set()
        self._held = {id(p) for p in root.parameters()} if isinstance(root, nn.Module) else set()
        # Everything below is put back when tracing ends, however it ends.
        with ExitStack() as patches:
            # range(), len() on a proxy in the model's own code (not torch's): len is a node of the
            # graph (x.new_zeros(len(x), d) stays symbolic in the batch), range decides its bounds.
            for namespace in _model_namespaces(root):
                for name, replacement in _TRACED_BUILTINS.items():
                    if name not in namespace:
                        patches.enter_context(_replaced(namespace, name, replacement))
                for name, value in list(namespace.items()):
                    # A @torch.jit.script helper takes no proxies: its Python function is traced
                    # instead, the same computation.
                    if isinstance(value, torch.jit.ScriptFunction) and hasattr(value, "_torchdynamo_inline"):
                        patches.enter_context(_replaced(namespace, name, _script_traced(value)))
                    elif value is CHECKPOINT:
                        patches.enter_context(_replaced(namespace, name, self._checkpoint))
            # checkpoint(lambda t: block(t), x) in a loop: eager recomputes with the last block.
            self._checkpointed: list[tuple[object, tuple]] = []  # (function, its closure's values)
            self.checkpoint_calls = 0
            patches.enter_context(_replaced(torch.utils.checkpoint, "checkpoint", self._checkpoint))
            # torch.distributions check their parameters' values as they are built (Normal's scale
            # positive), which a traced value has none of. A check only ever raises, so the stages
            # compute without it what eager computes with it; a distribution given
            # validate_args=True still asks, and is refused naming its line.
            patches.enter_context(_replaced(torch.distributions.Distribution, "_validate_args", False))
            # Normal(mu, std).rsample() sizes its draw as torch.Size(sample_shape + batch_shape),
            # and a batch shape taken from traced values is a node, which torch.Size cannot hold.
            patches.enter_context(
                _replaced(torch.distributions.Distribution, "_extended_shape", _traced_extended_shape)
            )
            patches.enter_context(
                _replaced(fx.Proxy, "__int__", lambda proxy: proxy.tracer.decide(proxy, int))
            )
            # x.dtype is the example's, as every buffer the program sends is sized for it: a value,
            # not a node, so torch.finfo(x.dtype).min (BERT's attention mask) traces.
            patches.enter_context(_replaced(fx.Proxy, "__getattr__", _static_dtype))
            # x[i] = v, which fx refuses ("'Proxy' object does not support item assignment").
            patches.enter_context(_replaced(fx.Proxy, "__setitem__", _traced_setitem))
            # *x.shape[:-1] or for part in x.split(4, 1), which fx refuses ("Proxy object cannot
            # be iterated") but where the code unpacks a fixed count (a, b = x.chunk(2)).
            patches.enter_context(_replaced(fx.Proxy, "__iter__", _traced_iter))
            # acc += h on a tensor changes it in place, for every other name of it too (skip = acc),
            # where fx, finding no __iadd__, would make a new tensor.
            for name, (in_place, plain) in _AUGMENTED.items():
                patches.enter_context(_replaced(fx.Proxy, name, _augmented(in_place, plain)))
            # A gradient penalty's second backward cannot run through the pipeline.
            patches.enter_context(_replaced(torch.autograd, "grad", _refused_autograd_grad))
            # random.uniform(0, 1) < p (LayerDrop, teacher forcing) runs once, as the graph is
            # traced: that one draw would decide every step. Refused, in the model's own names too.
            for home, name in _PYTHON_DRAWS:
                patches.enter_context(_replaced(home, name, _refused_draw(home, name)))
            for namespace in _model_namespaces(root):
                for name, value in list(namespace.items()):
                    drawn = next(((h, n) for h, n in _PYTHON_DRAWS if getattr(h, n, None) is value), None)
                    if drawn is not None:
                        patches.enter_context(_replaced(namespace, name, _refused_draw(*drawn)))
            # p.data = v refused, not silently lost; a custom autograd.Function one node.
            patches.enter_context(_replaced(fx.Proxy, "__setattr__", _traced_setattr))
            patches.enter_context(
                _replaced(torch.autograd.Function, "apply", classmethod(_custom_function_apply))
            )
            # grad_reverse = GradReverse.apply, bound before tracing (as pytorch-revgrad does): it
            # runs torch's own apply, which calls forward with proxies; that call becomes the node.
            for function in _model_functions(torch.autograd.Function):
                for name, value in _forward_as_node(function).items():
                    patches.enter_context(_replaced(function, name, value))
            patches.enter_context(_replaced(fx.Proxy, "__len__", _traced_proxy_len))
            # torch.zeros(b, d) with a proxy first is refused by torch's argument parser, where
            # torch.zeros((b, d)) traces: the same call, its sizes packed into one tuple.
            for name in SIZED_FACTORIES:
                patches.enter_context(_replaced(torch, name, _sizes_packed(getattr(torch, name))))
            # torch.sqrt(torch.tensor(d_k)) with d_k = q.size(-1): torch's data parser probes a
            # proxy for array interfaces and fails; a node instead, made from the sizes as it runs.
            for name in DATA_FACTORIES:
                patches.enter_context(_replaced(torch, name, _data_traced(getattr(torch, name))))
            # torch.no_grad() and its kin switch grad mode through one function: switched for real,
            # and recorded on every node made inside the region.
            patches.callback(_SET_GRAD_ENABLED, torch.is_grad_enabled())
            patches.enter_context(_replaced(torch._C, "_set_grad_enabled", self._record_grad_mode))
            # torch.autocast(...): entered for real (x.dtype and decided values see it), and
            # recorded on every node made inside it.
            patches.enter_context(
                _replaced(
                    AUTOCAST,
                    "__init__",
                    lambda mode, *args, **kwargs: self._init_autocast(mode, *args, **kwargs),
                )
            )
            patches.enter_context(_replaced(AUTOCAST, "__enter__", lambda mode: self._enter_autocast(mode)))
            patches.enter_context(
                _replaced(AUTOCAST, "__exit__", lambda mode, *exc: self._exit_autocast(mode, *exc))
            )
            _plain_tensors_as_buffers(root)
            # for p in self.parameters(): traced reads of the parameters, from the model's code only.
            self._module_paths = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
            patches.enter_context(
                _replaced(
                    nn.Module,
                    "named_parameters",
                    lambda module, prefix="", recurse=True, remove_duplicate=True: self._traced_parameters(
                        module, prefix, recurse, remove_duplicate, caller=sys._getframe(1)
                    ),
                )
            )
            patches.enter_context(
                _replaced(
                    nn.Module,
                    "parameters",
                    lambda module, recurse=True: (
                        p
                        for _, p in self._traced_parameters(
                            module, "", recurse, True, caller=sys._getframe(1)
                        )
                    ),
                )
            )
            # self.steps += 1 or self.ema = 0.9 * self.ema + ...: a buffer given a new value.
            patches.callback(self._put_back_attributes)
            patches.enter_context(
                _replaced(
                    nn.Module,
                    "__setattr__",
                    lambda module, name, value: self._record_setattr(module, name, value),
                )
            )
            if concrete_args is None and (self.example_inputs or self.none_inputs):
                concrete_args = self._defaults_not_given(root)
            # fx warns it cannot check a default that is not None, a bool or a number; it is the
            # value forward gets whenever the program runs, as the inputs are always the same.
            patches.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Was not able to add assertion")
            graph = super().trace(root, concrete_args)
            self._refuse_late_bound_checkpoints()
            if concrete_args or self.input_groups:
                _erase_constant_inputs(graph, set(self.example_inputs), set(concrete_args or ()))
                # A tuple default or a dict input makes fx flatten forward's inputs through a
                # pytree spec; with the constants gone the inputs are the example's tensors, flat.
                # It flattens what forward returns too: the output gets its structure back, so a
                # dict's "loss" is found by its key, not by its place.
                _unflatten_output(graph)
                graph._codegen = fx.graph.CodeGen()
            return graph

    def _checkpoint(self, function, *args, **kwargs):
        """``torch.utils.checkpoint.checkpoint`` while tracing: the function's closure is noted, so
        a name it reads that the model rebinds before backward is refused."""
        self._refuse_late_bound_checkpoints()
        self.checkpoint_calls += 1
        if inspect.isfunction(function) and function.__closure__:
            self._checkpointed.append((function, tuple(_cell_value(c) for c in function.__closure__)))
        return CHECKPOINT(function, *args, **kwargs)

    def _refuse_late_bound_checkpoints(self) -> None:
        """Eager runs a checkpointed function again in backward, reading its closure then: where
        forward has since rebound a name it reads (``for block in blocks: checkpoint(lambda t:
        block(t), x)``), every recomputation runs with the last value, which the program, making
        each call's own graph, would not copy. Inference has no backward to recompute in."""
        if not self.trains:
            return
        for function, values in self._checkpointed:
            names = function.__code__.co_freevars
            for name, cell, old in zip(names, function.__closure__, values):
                new = _cell_value(cell)
                if new is not old and not _equal_constants(new, old):
                    what = "a lambda" if function.__name__ == "<lambda>" else f"`{function.__name__}`"
                    raise ForwardError(
                        f"forward checkpoints {what} that reads `{name}` from around it, and then "
                        f"rebinds `{name}`: eager's recomputation in backward "
                        f"reads the last `{name}` for every call, which the program would not copy; "
                        f"bind it when the function is made (lambda t, {name}={name}: ...) or pass "
                        f"it as an argument to checkpoint"
                    )

    def _defaults_not_given(self, root: nn.Module) -> dict[str, object]:
        """forward's inputs the example inputs do not give, at their defaults: traced as
        placeholders they would be Proxies, never None, and ``if mask is not None`` would take
        the branch eager does not."""
        given = set(self.example_inputs) | set(self.input_groups)
        return {
            name: p.default
            for name, p in inspect.signature(root.forward).parameters.items()
            if name not in given
            and p.default is not p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        } | dict.fromkeys(self.none_inputs)

    def _proxy_placeholder(self, name, *args, **kwargs):
        if name not in self.input_groups:
            return super()._proxy_placeholder(name, *args, **kwargs)
        # A dict, list or named tuple input (forward(self, batch), batch["x"], x, y = batch or
        # batch.x): forward gets one of placeholders, one per entry named as ModelSpec names it
        # (batch_x, batch_0), so the graph's inputs are flat.
        keys, kind = self.input_groups[name]
        return regrouped(
            kind, {key: self.create_proxy("placeholder", f"{name}_{key}", (), {}) for key in keys}
        )

    def _traced_parameters(
        self, module: nn.Module, prefix: str, recurse: bool, remove_duplicate: bool, caller
    ):
        """``module.named_parameters(...)`` (and ``parameters()``, its values): called from the
        model's code (the ``caller`` frame), its parameters as traced reads (get_attr nodes);
        called by torch or ppcompile, as it is."""
        pairs = _NAMED_PARAMETERS(module, prefix, recurse, remove_duplicate)
        path = self._module_paths.get(id(module))
        if path is None or caller.f_code.co_filename.startswith(LIBRARY_DIRS):
            return pairs
        local = (name.removeprefix(f"{prefix}.") if prefix else name for name, _ in pairs)
        return ((f"{prefix}.{name}" if prefix else name, self._parameter_read(path, name)) for name in local)

    def _parameter_read(self, path: str, name: str) -> fx.Proxy:
        return self.create_proxy("get_attr", f"{path}.{name}" if path else name, (), {})

    def create_arg(self, a):
        if (
            isinstance(a, torch.Tensor)
            and not isinstance(a, nn.Parameter)
            and a not in self.tensor_attrs
            and not any(a is b for b in self.root.buffers())
        ):
            return self._constant_tensor(a)
        return super().create_arg(a)

    def _constant_tensor(self, a: torch.Tensor) -> fx.Node:
        """A tensor forward made without traced inputs, as a node that makes it again:
        ``torch.tensor([1.0, 2.0, 0.5], dtype=torch.float32)`` in the stage that uses it."""
        if a.device.type == "meta":
            raise ConstantTensorError(
                f"a tensor of shape {list(a.shape)} is computed from parameters fx does not trace (self.parameters() "
                "or a module's tensors read in a loop, as an L2 penalty does): it would get no gradient; "
                "read each parameter by name (self.fc.weight), or leave the penalty to the optimizer's weight decay"
            )
        if a.numel() > CONSTANT_ELEMENTS:
            raise ConstantTensorError(
                f"forward makes a constant tensor of shape {list(a.shape)}: register it as a buffer in "
                f"__init__ (self.register_buffer(name, tensor, persistent=False)) so each stage holding it "
                f"gets it; constants up to {CONSTANT_ELEMENTS} elements are written into the stage code"
            )
        return self.create_node("call_function", _TENSOR, (a.tolist(),), {"dtype": a.dtype})

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if self._regions:
            node.meta["ppc.regions"] = tuple(self._regions)
        return node

    def _init_autocast(self, mode, device_type, dtype=None, enabled=True, cache_enabled=None):
        """``torch.autocast(...)``'s constructor while tracing. ``x.device.type`` (a node here, of
        the meta device) is the device type the program is compiled for; a CUDA autocast compiled
        on a machine without CUDA is recorded as asked, though it does nothing while tracing."""
        if isinstance(device_type, fx.Proxy):
            device_type = self.device_type
        with _cuda_autocast_unavailable_quietly():
            _AUTOCAST_INIT(mode, device_type, dtype, enabled, cache_enabled)
        mode.ppc_enabled = enabled

    def _enter_autocast(self, mode):
        enabled = getattr(mode, "ppc_enabled", mode._enabled)
        self._regions.append(AutocastRegion(mode.device, mode.fast_dtype, enabled, mode._cache_enabled))
        return _AUTOCAST_ENTER(mode)

    def _exit_autocast(self, mode, *exc):
        self._close(AutocastRegion)
        return _AUTOCAST_EXIT(mode, *exc)

    def _close(self, kind: type) -> None:
        """Close the innermost open region of ``kind``."""
        at = max(i for i, region in enumerate(self._regions) if isinstance(region, kind))
        del self._regions[at]

    def _record_grad_mode(self, mode: bool) -> None:
        """``torch._C._set_grad_enabled(mode)`` while tracing: switch it, and open a region (or
        close the innermost one, where ``mode`` is the mode before it). The stage code opens a
        ``with torch.no_grad():`` where the model's does, so leaving it sets back whatever mode
        the stage runs in (under inference, still off)."""
        current = torch.is_grad_enabled()
        if mode == current:
            return  # set_grad_enabled(False) switches in __init__ and again in __enter__
        if self._grad_modes and self._grad_modes[-1] == mode:
            self._grad_modes.pop()
            self._close(GradModeRegion)
        else:
            self._grad_modes.append(current)
            self._regions.append(GradModeRegion(mode))
        _SET_GRAD_ENABLED(mode)

    def _record_setattr(self, module: nn.Module, name: str, value) -> None:
        """``module.name = value`` while tracing. A traced value given to a buffer rebinds it
        (:func:`rebind_buffer`, a node of the graph); the rest of this forward reads the new value,
        and the module keeps its tensor. (Not an in-place copy: a tensor saved for backward by an
        earlier micro-batch still in flight must keep its value.) A traced value given to a plain
        attribute (``self.last_attn = a``) is seen by the rest of this forward only, and the
        attribute is put back after tracing."""
        if not isinstance(value, fx.Proxy):
            old = module.__dict__.get(name)
            if _is_number(old) and _is_number(value) and old != value:
                raise ForwardError(
                    f"forward changes `{self.path_of_module(module) or 'self'}.{name}` from {old} to "
                    f"{value} on each call, which tracing would fix at the traced call's value; keep it "
                    f"in a buffer (self.register_buffer({name!r}, torch.tensor({old}))), whose updates "
                    "the program makes"
                )
            _MODULE_SETATTR(module, name, value)
        elif name in module._buffers:
            path = self.path_of_module(module)
            self.create_proxy("call_function", rebind_buffer, (f"{path}.{name}" if path else name, value), {})
            self._rebound[id(module._buffers[name])] = value
        else:
            self._assigned.append((module, name, module.__dict__.get(name, _ABSENT)))
            object.__setattr__(module, name, value)

    def _put_back_attributes(self) -> None:
        for module, name, old in reversed(self._assigned):
            if old is _ABSENT:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, old)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, torch.jit.ScriptModule):  # no Python forward to trace: one call
            return True
        return _unrolled_forward(m) is None and super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        unrolled = _unrolled_forward(m)
        if unrolled is not None:
            forward = functools.partial(unrolled, self, m)
        if id(m) not in self._installed:
            # Built as forward runs (Hugging Face's `loss_fct = CrossEntropyLoss()`, an
            # nn.Sequential of the model's own layers): its forward, traced through; weights of
            # its own would be new weights at every call.
            if any(id(p) not in self._held for p in m.parameters()):
                raise ForwardError(
                    f"forward calls a {type(m).__name__} that is not a submodule of the model (built as "
                    "forward runs, or held in a plain list or dict): its parameters are trained by no "
                    "optimizer; make it a submodule in __init__ (nn.ModuleList or nn.ModuleDict for several)"
                )
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if id(attr_val) in self._rebound:  # read after this forward rebound it
            return self._rebound[id(attr_val)]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.decide(obj, bool)

    def decide(self, proxy: fx.Proxy, convert) -> bool | int:
        """``convert`` (bool or int) of the proxy's value for the example inputs, recorded."""
        try:
            with _untraced():
                value = convert(self._value(proxy.node))
        except Exception as e:
            if convert is int and "meta tensors" in str(e):
                # MoCo's ptr = int(self.queue_ptr): an index read from a tensor.
                raise ForwardError(
                    "forward reads a tensor's value (int()), which ppcompile cannot: it sizes every "
                    "value from the input shapes; keep the index a tensor (index_copy_, torch.where), "
                    "or do this outside the compiled model"
                ) from None
            raise fx.proxy.TraceError(
                "this value depends on a tensor's values, not only on shapes (computing it for "
                f"the example's shapes failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        self.decided.append((self._caller(), value))
        self._decisions.append((proxy.node, convert))
        return value

    def decision_formulas(self, input_dims: dict[str, dict[int, str]], symbols: dict) -> list[dict]:
        """Per decided condition (in ``decided``'s order), what a micro-batch of other sizes must
        keep to run as the model would: ``{"formula": "s > 5"}``, the condition in the symbolic
        dims, where it is shape arithmetic on the inputs' sizes (``x.size(1) > 5``,
        ``range(x.shape[-2] // 2)``); else ``{"depends_on": ["b", "s"]}``, the dims of the inputs
        it was computed from (a size of an intermediate tensor), each of which must stay as it was.
        A condition that depends on no symbolic dim is ``{}``."""
        traced_at = {
            symbol: int(self.example_inputs[name].shape[dim])
            for name, named in input_dims.items()
            for dim, symbol in named.items()
        }
        found = []
        for (_, decided), (node, convert) in zip(self.decided, self._decisions):
            try:
                value = _symbolic_value(node, self.example_inputs, input_dims, symbols, self._values, {})
                formula = sympy.sympify(_BUILTIN_LEN(value) if convert is _BUILTIN_LEN else value)
                if convert is int and not formula.is_integer:  # int(x.size(1) / 2) of a positive size
                    formula = sympy.floor(formula)
                python = pycode(formula, fully_qualified_modules=False)  # ==, and, not: Python's own
                # Kept only where the runtime computes from it what was decided here.
                if decided_value(python, decided, traced_at) != decided:
                    raise _NotShapeArithmetic
                found.append({"formula": python} if formula.free_symbols else {})
            except Exception:  # noqa: BLE001 - not a formula the runtime can follow: its dims, held
                inputs = {n.target for n in _ancestors(node) if n.op == "placeholder"}
                depends = sorted({s for name in inputs for s in input_dims.get(name, {}).values()})
                found.append({"depends_on": depends} if depends else {})
        return found

    def value_of(self, node: fx.Node) -> object:
        """``node``'s value for the example inputs, on meta tensors (a shape to read)."""
        return self._value(node)

    def _value(self, target: fx.Node) -> object:
        """``target``'s value for the example inputs, on meta tensors, computing what it needs."""
        needed, stack = set(), [target]
        while stack:
            node = stack.pop()
            if node in self._values or node in needed:
                continue
            needed.add(node)
            stack.extend(node.all_input_nodes)
        self._asked.update(needed)
        for node in self.graph.nodes:  # in the graph's order, so every input comes first
            if node in needed and node not in self._values:
                self._values[node] = self._run(node)
        return self._values[target]

    def _run(self, node: fx.Node) -> object:
        args = fx.node.map_arg(node.args, self._values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self._values.__getitem__)
        if node.op in ("call_function", "call_method", "call_module") and has_autocast(node):
            # Autocast leaves meta tensors alone: there `h.dtype` after a linear would read float32
            # where the model's forward gets bfloat16 (HF's RMSNorm casts back to it).
            module = self.root.get_submodule(node.target) if node.op == "call_module" else None
            return run_on_fake_cpu(node, module, args, kwargs, {self.device_type: "cpu"})
        if node.op == "placeholder":
            if node.target in self.example_inputs:
                return self.example_inputs[node.target]
            if args:  # an input left at its default
                return args[0]
            raise ValueError(f"no example input for {node.target!r}")
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.root)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        raise ValueError(f"cannot evaluate a {node.op} node")

    def drop_conditions(self, graph: fx.Graph) -> None:
        """Erase the shape queries and comparisons only the decided conditions read: ``t <= 32``
        has no use left in the traced graph once its branch is taken."""
        for node in reversed(list(graph.nodes)):
            if node in self._asked and not node.users and _is_shape_arithmetic(node):
                graph.erase_node(node)

    def _caller(self) -> str:
        """``file:line: `code``` of the model's code that asked, the innermost frame outside torch."""
        for frame in reversed(traceback.extract_stack()):
            if not frame.filename.startswith(LIBRARY_DIRS):
                path = Path(frame.filename)
                shown = (
                    self.model_path
                    if self.model_path and path.resolve() == Path(self.model_path).resolve()
                    else path.name
                )
                return f"{shown}:{frame.lineno}: `{(frame.line or '').strip()}`"
        return "the model"


def _unrolled_forward(module: nn.Module):
    """The traceable stand-in for torch.nn's transformer container ``module``, or None.

    fx keeps every ``torch.nn`` module whole, which makes a stack of encoder layers one node no
    cut can fall inside. Their forwards cannot be traced as written (they test mask values and
    take a nested-tensor path on runtime conditions), but what they compute is a loop over the
    layers; the stand-ins trace that loop. A subclass with its own forward stays whole, and so
    does an encoder in eval mode that may take the nested-tensor path (which zeroes padded
    positions), where eager's output would depend on conditions known only when it runs.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return None
    forward = type(module).forward
    if forward is nn.TransformerEncoder.forward:
        if getattr(module, "use_nested_tensor", False) and not module.layers[0].training:
            return None
        return _traced_encoder
    if forward is nn.TransformerDecoder.forward:
        return _traced_decoder
    if forward is nn.Transformer.forward:
        return _traced_transformer
    return None


def _is_causal(tracer: PipelineTracer, layer: nn.Module, mask, is_causal, x, batch_first: bool):
    """The ``is_causal`` torch's container passes ``layer``: a hint given is taken; given a mask and
    no hint, a node that tests the mask (:func:`is_causal_mask`), made just before the layer and
    counted as the layer's, so a split by layers keeps the two together."""
    if isinstance(is_causal, fx.Proxy):
        return is_causal
    if is_causal is not None or mask is None:
        return is_causal is True
    test = tracer.create_proxy("call_function", is_causal_mask, (mask, x, batch_first), {})
    path = tracer.path_of_module(layer)
    test.node.meta["nn_module_stack"] = {
        **test.node.meta.get("nn_module_stack", {}),
        path: (path, type(layer)),
    }
    return test


def _canonical_mask(tracer: PipelineTracer, mask, name: str, other, like):
    """``F._canonical_mask`` as a node: a boolean mask made an additive one of ``like``'s dtype.
    ``other``, the encoder's attention mask beside its padding mask, only sets torch's warning
    about two masks of different kinds."""
    if mask is None:
        return None
    kwargs = dict(
        mask=mask,
        mask_name=name,
        other_type=None if other is None else other.dtype,
        other_name="" if other is None else "mask",
        target_type=like.dtype,
    )
    return tracer.create_proxy("call_function", F._canonical_mask, (), kwargs)


def _traced_encoder(tracer, encoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """``nn.TransformerEncoder.forward`` off its nested-tensor path, with masks made additive once."""
    src_key_padding_mask = _canonical_mask(tracer, src_key_padding_mask, "src_key_padding_mask", mask, src)
    mask = _canonical_mask(tracer, mask, "mask", None, src)
    batch_first = encoder.layers[0].self_attn.batch_first
    return _through_layers(
        encoder,
        src,
        lambda layer, output: layer(
            output,
            src_mask=mask,
            is_causal=_is_causal(tracer, layer, mask, is_causal, output, batch_first),
            src_key_padding_mask=src_key_padding_mask,
        ),
    )


def _traced_decoder(
    tracer,
    decoder,
    tgt,
    memory,
    tgt_mask=None,
    memory_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    tgt_is_causal=None,
    memory_is_causal=False,
):
    """``nn.TransformerDecoder.forward``."""
    batch_first = decoder.layers[0].self_attn.batch_first
    return _through_layers(
        decoder,
        tgt,
        lambda layer, output: layer(
            output,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=_is_causal(tracer, layer, tgt_mask, tgt_is_causal, output, batch_first),
            memory_is_causal=memory_is_causal,
        ),
    )


def _through_layers(container, output, run_layer):
    """The stack's loop, as torch's encoder and decoder run it: each layer on the last one's
    output, then the container's norm if it has one."""
    for layer in container.layers:
        output = run_layer(layer, output)
    return container.norm(output) if container.norm is not None else output


def _traced_transformer(
    tracer,
    model,
    src,
    tgt,
    src_mask=None,
    tgt_mask=None,
    memory_mask=None,
    src_key_padding_mask=None,
    tgt_key_padding_mask=None,
    memory_key_padding_mask=None,
    src_is_causal=None,
    tgt_is_causal=None,
    memory_is_causal=False,
):
    """``nn.Transformer.forward`` without its shape checks, which eager made on the example."""
    memory = model.encoder(
        src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal
    )
    return model.decoder(
        tgt,
        memory,
        tgt_mask=tgt_mask,
        memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal,
    )


# The most elements of a tensor forward makes from constants that a stage file writes out.
CONSTANT_ELEMENTS = 64


class ForwardError(TypeError):
    """Something forward does that stage code cannot do as eager does; the message says what
    would work instead."""


class ConstantTensorError(ForwardError):
    """A tensor forward makes outside the traced graph that the program cannot make again."""


# Attributes whose assignment changes what autograd does with a tensor: on a proxy they would be
# set on the proxy object and lost, and the program would train another model.
_AUTOGRAD_ATTRIBUTES = {
    "data": "write `with torch.no_grad(): {name}.copy_(new_value)`",
    "grad": "set gradients outside forward",
    "requires_grad": "use {name}.detach() for a value without gradient, or freeze parameters before compiling",
}
_FUNCTION_APPLY = vars(torch.autograd.Function)["apply"]


def _traced_setattr(proxy: fx.Proxy, name: str, value) -> None:
    if name == "data" and _same_kind_of_tensor(proxy, value):
        # MoCo's key encoder: p.data = p.data * m + q.data * (1 - m) gives the weight new values,
        # as copying them in without gradient does; order_mutations places it like any such write.
        with torch.no_grad():
            proxy.copy_(value)
        return
    if name in _AUTOGRAD_ATTRIBUTES and isinstance(getattr(proxy, "tracer", None), PipelineTracer):
        from ppcompile.codegen import attribute_path  # codegen reads the tracer's node kinds

        node = proxy.node
        shown = f"self.{attribute_path(node.target)}" if node.op == "get_attr" else "tensor"
        what = (
            f"`{shown}.{name}`" if node.op == "get_attr" else f"`.{name}` of a computed tensor ({node.name})"
        )
        instead = _AUTOGRAD_ATTRIBUTES[name].format(name=shown)
        raise ForwardError(f"forward sets {what}, which tracing cannot record; {instead}")
    object.__setattr__(proxy, name, value)


def _same_kind_of_tensor(proxy: fx.Proxy, value) -> bool:
    """A module's parameter or buffer and a traced value of its shape and dtype."""
    if proxy.node.op != "get_attr" or not isinstance(value, fx.Proxy):
        return False
    old, new = _value_if_known(proxy), _value_if_known(value)
    return (
        isinstance(old, torch.Tensor)
        and isinstance(new, torch.Tensor)
        and (old.shape, old.dtype) == (new.shape, new.dtype)
    )


_AUGMENTED = {
    "__iadd__": (operator.iadd, operator.add),
    "__isub__": (operator.isub, operator.sub),
    "__imul__": (operator.imul, operator.mul),
    "__itruediv__": (operator.itruediv, operator.truediv),
}
_AUTOGRAD_GRAD = torch.autograd.grad


def _traced_extended_shape(self, sample_shape=()):
    """``Distribution._extended_shape`` while tracing: a sample's shape as a node where the batch
    shape is one (a distribution of traced values), else the torch.Size torch makes."""
    shape = tuple(sample_shape) + self._batch_shape + self._event_shape
    return shape if isinstance(shape, fx.Proxy) else torch.Size(shape)


def _augmented(in_place, plain):
    def apply(proxy: fx.Proxy, other):
        """``x += y``: in place where ``x`` is a tensor, as eager runs it. A buffer read from its
        module (``self.steps += 1``) is rebound instead, as ``self.steps = self.steps + 1`` is
        (:meth:`PipelineTracer._record_setattr`), and a number is added to as numbers are."""
        is_tensor = proxy.node.op != "get_attr" and isinstance(_value_if_known(proxy), torch.Tensor)
        return proxy.tracer.create_proxy(
            "call_function", in_place if is_tensor else plain, (proxy, other), {}
        )

    return apply


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _python_draws() -> list[tuple[object, str]]:
    """(module, name) of the draws of Python's ``random`` and NumPy's ``numpy.random``."""
    import random

    names = ("random", "uniform", "randint", "randrange", "choice", "choices", "gauss", "sample", "shuffle")
    draws = [(random, name) for name in names]
    try:
        import numpy.random
    except ImportError:
        return draws
    names = (
        "rand",
        "randn",
        "random",
        "random_sample",
        "uniform",
        "normal",
        "randint",
        "choice",
        "permutation",
    )
    return draws + [(numpy.random, name) for name in names if hasattr(numpy.random, name)]


_PYTHON_DRAWS = _python_draws()


def _refused_draw(home, name: str):
    """A draw of Python's or NumPy's random while tracing. It runs once, as the graph is traced,
    so it may only decide what every draw would: a uniform draw in [0, 1) compared with a bound
    (``random.uniform(0, 1) < self.layerdrop`` with LayerDrop 0) is a :class:`_Draw`; any other is
    refused."""
    what = f"{home.__name__}.{name}"

    def drawn(*args, **kwargs):
        if name in ("random", "random_sample", "rand") and not args and not kwargs:
            return _Draw(0.0, 1.0, what)
        if (
            name == "uniform"
            and len(args) == 2
            and not kwargs
            and all(isinstance(a, (int, float)) for a in args)
        ):
            return _Draw(float(args[0]), float(args[1]), what)
        raise ForwardError(_draw_refusal(what))

    return drawn


def _draw_refusal(what: str) -> str:
    return (
        f"forward draws with {what}, which runs once, as the model is traced: that one draw would decide "
        "every step and micro-batch (a layer dropped or kept for good); draw with torch and use the "
        "draw as a mask (keep = (torch.rand(()) >= p).float(); x = x + keep * layer(x)), or leave it out "
        "of the pipelined model (LayerDrop 0, teacher forcing always on)"
    )


class _Draw(float):
    """A uniform draw in [low, high) as tracing sees it: a comparison with a number is decided where
    it holds alike across the interval (``draw < 0.0`` with LayerDrop 0 is False whatever is drawn,
    ``draw > 0.0`` True but for a draw of exactly 0); anything else done with it is refused, since
    the program would keep the one value drawn while tracing."""

    def __new__(cls, low: float, high: float, what: str):
        draw = super().__new__(cls, (low + high) / 2)
        # The open interval's ends: a draw equal to an end has probability zero.
        draw.ends = (math.nextafter(low, high), math.nextafter(high, low))
        draw.what = what
        return draw

    def _decided(self, compare, other):
        if not isinstance(other, (int, float)) or isinstance(other, bool):
            raise ForwardError(_draw_refusal(self.what))
        low, high = (compare(end, float(other)) for end in self.ends)
        if low != high:
            raise ForwardError(_draw_refusal(self.what))
        return low

    def __lt__(self, other):
        return self._decided(operator.lt, other)

    def __le__(self, other):
        return self._decided(operator.le, other)

    def __gt__(self, other):
        return self._decided(operator.gt, other)

    def __ge__(self, other):
        return self._decided(operator.ge, other)

    def _refused(self, *args, **kwargs):
        raise ForwardError(_draw_refusal(self.what))

    __eq__ = __ne__ = __bool__ = __int__ = __index__ = __round__ = __hash__ = _refused
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refused
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __pow__ = __rpow__ = __neg__ = _refused


def _refused_autograd_grad(outputs, inputs, *args, **kwargs):
    if any(isinstance(t, fx.Proxy) for t in (*_as_tuple(outputs), *_as_tuple(inputs))):
        raise ForwardError(
            "forward calls torch.autograd.grad (a gradient penalty), a backward inside forward that "
            "cannot be cut into pipeline stages; compute the penalty outside the compiled model"
        )
    return _AUTOGRAD_GRAD(outputs, inputs, *args, **kwargs)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _custom_function_apply(cls, *args, **kwargs):
    """``Function.apply``: torch's own functions (reentrant checkpoint) are traced through as fx
    does; a model's own ``torch.autograd.Function`` is one node calling its ``apply``, since tracing
    into its forward would lose its custom backward."""
    proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
    if proxies and cls.__module__ == "torch.utils.checkpoint" and cls.__name__ == "CheckpointFunction":
        if proxies[0].tracer.trains:
            _refuse_reentrant_without_gradient(proxies)
    if not cls.__module__.startswith("torch.") and proxies:
        tracer = proxies[0].tracer
        # One node calling the class's apply (cls.apply is this stand-in while tracing).
        return tracer.create_proxy("call_function", FunctionApply.of(cls), args, kwargs)
    with warnings.catch_warnings():
        # Reentrant checkpoint on proxies, which are not tensors: "None of the inputs have
        # requires_grad=True", a warning about tracing, not about the model.
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
        return _FUNCTION_APPLY.__func__(cls, *args, **kwargs)


def _model_functions(base: type) -> list[type]:
    """Every ``torch.autograd.Function`` subclass defined outside torch, with its own forward."""
    found, pending = [], list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not cls.__module__.startswith("torch.") and "forward" in vars(cls):
            found.append(cls)
    return found


def _forward_as_node(cls: type) -> dict:
    """Stand-ins for ``cls.forward`` (and ``setup_context``) while tracing: called by torch's own
    ``apply`` with proxies, they make the one node ``_custom_function_apply`` makes, instead of
    tracing through forward and losing the custom backward."""
    forward = vars(cls)["forward"]
    plain = forward.__func__ if isinstance(forward, (staticmethod, classmethod)) else forward
    takes_ctx = not _is_setup_context_defined(cls)

    def traced_forward(*args, **kwargs):
        given = args[1:] if takes_ctx else args
        proxies = [a for a in (*given, *kwargs.values()) if isinstance(a, fx.Proxy)]
        if not proxies:
            return plain(*args, **kwargs)
        return proxies[0].tracer.create_proxy("call_function", FunctionApply.of(cls), given, kwargs)

    stand_ins = {"forward": staticmethod(traced_forward)}
    if not takes_ctx:
        setup_context = cls.setup_context  # as resolved before the stand-in

        def traced_setup_context(ctx, inputs, output):
            if isinstance(output, fx.Proxy):
                return None  # the node's own apply sets its context up when it runs
            return setup_context(ctx, inputs, output)

        stand_ins["setup_context"] = staticmethod(traced_setup_context)
    return stand_ins


def _is_setup_context_defined(cls: type) -> bool:
    """Whether ``cls`` sets its context up in ``setup_context`` (forward then takes no ctx)."""
    return cls.setup_context is not torch.autograd.function._SingleLevelFunction.setup_context


def _refuse_reentrant_without_gradient(proxies: list[fx.Proxy]) -> None:
    """Reentrant checkpoint on inputs none of which needs a gradient gives eager's checkpointed
    layers no gradient at all (torch warns); the program, which traces through it, would train them."""
    values = [_value_if_known(p) for p in proxies]
    if any(v is _UNKNOWN for v in values):
        return  # not computable here: traced through as before
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors and not any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        names = ", ".join(p.node.name for p, v in zip(proxies, values) if isinstance(v, torch.Tensor))
        raise ForwardError(
            f"forward calls torch.utils.checkpoint with use_reentrant=True on {names}, none of which needs a "
            'gradient: eager then gives the checkpointed layers no gradient (torch warns "None of the '
            'inputs have requires_grad=True"), which the program would not copy; pass use_reentrant=False'
        )


class FunctionApply:
    """``cls.apply`` of a model's ``torch.autograd.Function`` as a graph target. Named after the
    class's module, not torch's (where ``apply`` is defined), so fx's own code for the graph
    holds the target itself instead of looking ``torch.autograd.function.apply`` up."""

    _made: dict[type, FunctionApply] = {}

    def __init__(self, cls: type):
        self.function = cls
        self.__name__ = "apply"
        self.__qualname__ = f"{cls.__qualname__}.apply"
        self.__module__ = cls.__module__

    @classmethod
    def of(cls, function: type) -> FunctionApply:
        """One target per class, so two calls of it are the same operator."""
        if function not in cls._made:
            cls._made[function] = cls(function)
        return cls._made[function]

    def __call__(self, *args, **kwargs):
        return _FUNCTION_APPLY.__func__(self.function, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.__qualname__}"


def autograd_function(target) -> type | None:
    """The ``torch.autograd.Function`` subclass whose ``apply`` ``target`` is, or None."""
    return target.function if isinstance(target, FunctionApply) else None


_BUILTIN_LEN, _BUILTIN_RANGE = builtins.len, builtins.range
_SET_GRAD_ENABLED = torch._C._set_grad_enabled
AUTOCAST = torch.amp.autocast_mode.autocast  # torch.autocast; torch.cuda.amp.autocast enters through it
_AUTOCAST_INIT, _AUTOCAST_ENTER, _AUTOCAST_EXIT = AUTOCAST.__init__, AUTOCAST.__enter__, AUTOCAST.__exit__


@contextmanager
def _cuda_autocast_unavailable_quietly() -> Iterator[None]:
    """A GPU program's autocast, made where CUDA is not (compiling on a CPU machine), does nothing
    here, as torch warns: expected, so not said."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="CUDA is not available")
        yield


class AutocastRegion(NamedTuple):
    """One ``torch.autocast(...)`` a node was made inside: a stage runs the node under the same."""

    device_type: str
    dtype: torch.dtype
    enabled: bool
    cache_enabled: bool

    def code(self) -> str:
        """The ``with`` statement's expression, defaults left out."""
        parts = [f'"{self.device_type}"', f"dtype={self.dtype}"]
        if not self.enabled:
            parts.append("enabled=False")
        if not self.cache_enabled:
            parts.append("cache_enabled=False")
        return f"torch.autocast({', '.join(parts)})"


class GradModeRegion(NamedTuple):
    """One ``torch.no_grad()`` (or ``torch.enable_grad()``) a node was made inside."""

    enabled: bool

    def code(self) -> str:
        """The ``with`` statement's expression."""
        return "torch.enable_grad()" if self.enabled else "torch.no_grad()"


Region = AutocastRegion | GradModeRegion


def run_on_fake_cpu(node: fx.Node, module: nn.Module | None, args, kwargs, runs_as: dict[str, str]) -> object:
    """``node`` (a call; ``module`` its module, for a call_module) on meta tensors ``args`` and
    ``kwargs``, run on fake CPU copies of them under the node's regions (``runs_as`` as
    :func:`under_regions` takes it), its result back on meta: what a node traced inside a
    ``torch.autocast`` region computes, which autocast, leaving meta tensors alone, would not
    give on meta (a linear's bfloat16 output, and what reads its dtype)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        args, kwargs = pytree.tree_map(on_fake_cpu, (args, kwargs))
        with torch.enable_grad(), under_regions(node, runs_as):
            if node.op == "call_function":
                out = node.target(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                held = {**dict(module.named_parameters()), **dict(module.named_buffers())}
                weights = {name: on_fake_cpu(t) for name, t in held.items()}
                out = torch.func.functional_call(module, weights, tuple(args), kwargs)
    return as_meta(out)


def on_fake_cpu(value):
    """A meta tensor as a CPU tensor of its shape, strides and dtype (under a FakeTensorMode: fake)."""
    if not isinstance(value, torch.Tensor) or value.device.type != "meta":
        return value
    made = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
    return made.requires_grad_(value.requires_grad) if value.requires_grad else made


def as_meta(value):
    """``value`` with each tensor replaced by a meta tensor of its shape, strides and dtype."""
    if isinstance(value, torch.Tensor):
        meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return meta.requires_grad_(value.requires_grad) if value.requires_grad else meta
    if isinstance(value, (tuple, list)):
        items = [as_meta(v) for v in value]
        if hasattr(type(value), "_make"):  # a named tuple
            return type(value)._make(items)
        return type(value)(items)  # a list, a tuple, or torch.return_types (max's values, indices)
    return value


def has_autocast(node: fx.Node) -> bool:
    return any(isinstance(region, AutocastRegion) for region in node.meta.get("ppc.regions", ()))


def under_regions(node: fx.Node, runs_as: dict[str, str] | None = None) -> ExitStack:
    """The grad-mode and autocast regions ``node`` was traced inside, entered: run the node in them
    as the model runs it (what it saves for backward, its dtypes). ``runs_as`` maps the device type the program
    is compiled for to the one this run's tensors are on (``{"cuda": "cpu"}``: sizing on fake CPU
    tensors a program for GPUs); a region for another device type is left out, as autocast leaves
    tensors on other devices alone."""
    stack = ExitStack()
    for region in node.meta.get("ppc.regions", ()):
        if isinstance(region, GradModeRegion):
            stack.enter_context(torch.set_grad_enabled(region.enabled))
            continue
        device_type = region.device_type if runs_as is None else runs_as.get(region.device_type)
        if device_type is not None:
            with _cuda_autocast_unavailable_quietly():
                autocast = torch.autocast(
                    device_type,
                    dtype=region.dtype,
                    enabled=region.enabled,
                    cache_enabled=region.cache_enabled,
                )
            stack.enter_context(autocast)
    return stack


def rebind_buffer(fqn: str, value: torch.Tensor) -> None:
    """What ``self.ema = 0.9 * self.ema + ...`` in a model's forward traces to: the buffer ``fqn``
    is the tensor ``value`` from then on. The stage file writes the assignment itself
    (``self.layers[0].ema = add_1``); compiling, the graph's value is what later reads see."""


# What a buffer's assignment traces to.
EFFECT_FUNCTIONS = (rebind_buffer,)


def is_effect(node: fx.Node) -> bool:
    """A node run for its effect on state (a buffer's rebinding): it runs where the model runs
    it, costs nothing, and is never run alone."""
    return node.op == "call_function" and node.target in EFFECT_FUNCTIONS


_PROXY_GETATTR = fx.Proxy.__getattr__


def assign_items(x: torch.Tensor, index, value) -> torch.Tensor:
    """What ``x[index] = value`` in a model's forward traces to: the assignment, in place, and
    ``x`` returned, as an in-place op returns what it changed (``passes/order_mutations.py``
    points later reads of ``x`` here). The stage file writes the assignment itself."""
    x[index] = value
    return x


def _traced_setitem(proxy: fx.Proxy, index, value) -> None:
    proxy.tracer.create_proxy("call_function", assign_items, (proxy, index, value), {})


def _traced_iter(proxy: fx.Proxy):
    """``iter(proxy)``: ``proxy[0]``, ``proxy[1]``, ... as many as ``a, b = proxy`` unpacks, or else
    as many as the proxy's value for the example inputs has: a shape's rank, which no size
    changes, or a length decided like ``range``'s bounds (``x.split(4, 1)`` has more parts when
    ``x`` is longer)."""
    count = _unpacked_count(sys._getframe(1))
    if count is None:
        value = _example_value(proxy, "iterating")
        count = len(value) if isinstance(value, torch.Size) else proxy.tracer.decide(proxy, _BUILTIN_LEN)
    return (proxy[i] for i in _BUILTIN_RANGE(count))


def _traced_proxy_len(proxy: fx.Proxy) -> int:
    """``len(proxy)`` outside the model's code (whose ``len`` makes a node): a shape's rank, so
    ``[*x.shape[:-1], -1]``, which asks the length first, builds; for any other value a TypeError,
    after which Python iterates without a length."""
    value = _example_value(proxy, "len() of")
    if isinstance(value, torch.Size):
        return len(value)
    raise TypeError(f"len() of a traced {type(value).__name__} outside the model's code")


_UNKNOWN = object()  # a value meta tensors cannot compute


def _value_if_known(proxy: fx.Proxy) -> object:
    """The proxy's value for the example inputs, on meta tensors; ``_UNKNOWN`` where that cannot
    be computed (a tensor's data is read), for callers that then trace as fx does."""
    try:
        with _untraced():
            return proxy.tracer._value(proxy.node)
    except Exception:  # noqa: BLE001 - any failure means the same: not known here
        return _UNKNOWN


def _example_value(proxy: fx.Proxy, doing: str) -> object:
    """The proxy's value for the example inputs, on meta tensors."""
    try:
        with _untraced():
            return proxy.tracer._value(proxy.node)
    except Exception as e:  # noqa: BLE001 - one line naming what failed
        raise fx.proxy.TraceError(
            f"{doing} a value that meta tensors cannot compute ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _unpacked_count(frame) -> int | None:
    """The count ``a, b, c = ...`` unpacks, where ``frame`` is at such an unpacking (the way fx
    itself iterates a proxy); None elsewhere."""
    instructions = list(dis.get_instructions(frame.f_code))
    at = bisect.bisect_left(instructions, frame.f_lasti, key=lambda i: i.offset)
    if at < len(instructions) and instructions[at].opname == "UNPACK_SEQUENCE":
        return instructions[at].argval
    return None


def _static_dtype(proxy: fx.Proxy, name: str):
    if name in ("register_hook", "register_post_accumulate_grad_hook") and isinstance(
        proxy.tracer, PipelineTracer
    ):
        raise ForwardError(
            f"forward registers a gradient hook on {proxy.node.name} ({name}), which stage code cannot "
            "run; register hooks outside forward, or scale the gradient with torch operations "
            "(x * s + (x - x * s).detach() passes x forward and scales its gradient by s)"
        )
    if name == "dtype" and isinstance(proxy.tracer, PipelineTracer):
        value = _value_if_known(proxy)
        if hasattr(value, "dtype"):
            return value.dtype
        # Not computable on meta tensors: a node, as fx makes it.
    return _PROXY_GETATTR(proxy, name)


def _traced_len(obj) -> int | fx.Proxy:
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", _BUILTIN_LEN, (obj,), {})
    return _BUILTIN_LEN(obj)


def _traced_range(*bounds) -> range:
    return _BUILTIN_RANGE(*(b.tracer.decide(b, int) if isinstance(b, fx.Proxy) else b for b in bounds))


_TRACED_BUILTINS = {"len": _traced_len, "range": _traced_range}


class _NotShapeArithmetic(Exception):
    """A decided value computed from more than the inputs' sizes."""


# Python's operators on sizes, as sympy computes them on symbolic ones; == and != compare values,
# which sympy's own == (structural equality) does not.
_SYMBOLIC_OPERATORS = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.floordiv: operator.floordiv,
    operator.truediv: lambda a, b: sympy.sympify(a) / sympy.sympify(b),
    operator.mod: operator.mod,
    operator.neg: operator.neg,
    operator.getitem: operator.getitem,
    operator.gt: operator.gt,
    operator.ge: operator.ge,
    operator.lt: operator.lt,
    operator.le: operator.le,
    operator.eq: lambda a, b: sympy.Eq(sympy.sympify(a), sympy.sympify(b)),
    operator.ne: lambda a, b: sympy.Ne(sympy.sympify(a), sympy.sympify(b)),
    operator.not_: lambda a: sympy.Not(a),
    _BUILTIN_LEN: _BUILTIN_LEN,
}


def _symbolic_value(
    node: fx.Node, example_inputs: dict, input_dims: dict, symbols: dict, values: dict, memo: dict
):
    """``node``'s value with each input's named dims as their symbols: a size, a tuple of sizes, or a
    sympy expression or relation of them; of any other tensor (``values``: the example's, on
    meta) its rank, which no size changes. Raises _NotShapeArithmetic for anything but sizes of
    the inputs, ranks, and arithmetic on them."""
    if node in memo:
        return memo[node]
    if node.op != "placeholder" and isinstance(values.get(node), torch.Tensor):
        memo[node] = _SymbolicShape(None, rank=values[node].dim())
        return memo[node]
    args = fx.node.map_arg(
        node.args, lambda n: _symbolic_value(n, example_inputs, input_dims, symbols, values, memo)
    )
    if node.op == "placeholder":
        example = example_inputs.get(node.target)
        if not isinstance(example, torch.Tensor):
            raise _NotShapeArithmetic
        named = {d % example.dim(): symbol for d, symbol in input_dims.get(node.target, {}).items()}
        value = _SymbolicShape(
            tuple(symbols[named[d]] if d in named else size for d, size in enumerate(example.shape))
        )
    elif node.op == "call_method" and args and isinstance(args[0], _SymbolicShape) and not node.kwargs:
        if node.target == "dim":
            value = args[0].dim
        elif node.target == "size" and args[0].sizes is not None:
            value = args[0].sizes if len(args) == 1 else args[0].sizes[args[1]]
        else:
            raise _NotShapeArithmetic
    elif node.op == "call_function" and node.target is getattr and isinstance(args[0], _SymbolicShape):
        if args[1] == "ndim":
            value = args[0].dim
        elif args[1] == "shape" and args[0].sizes is not None:
            value = args[0].sizes
        else:
            raise _NotShapeArithmetic
    elif node.op == "call_function" and node.target in _SYMBOLIC_OPERATORS and not node.kwargs:
        if any(isinstance(a, _SymbolicShape) for a in args):
            raise _NotShapeArithmetic
        value = _SYMBOLIC_OPERATORS[node.target](*args)
    else:
        raise _NotShapeArithmetic
    memo[node] = value
    return value


@dataclasses.dataclass(frozen=True)
class _SymbolicShape:
    """A tensor, as far as shape arithmetic sees it: an input's sizes, symbols where its dims are
    named; of another tensor, its rank alone (sizes None)."""

    sizes: tuple | None
    rank: int | None = None

    @property
    def dim(self) -> int:
        return len(self.sizes) if self.sizes is not None else self.rank


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


SIZED_FACTORIES = ("zeros", "ones", "empty", "rand", "randn")


def _sizes_packed(factory):
    def call(*args, **kwargs):
        whole_shape = len(args) == 1 and isinstance(args[0], fx.Proxy) and _is_sizes(args[0])
        if (
            not whole_shape  # torch.zeros(x.shape), torch.ones(x.shape[:-1] + (1,)): already the tuple
            and any(isinstance(a, fx.Proxy) for a in args)
            and all(isinstance(a, (int, fx.Proxy)) for a in args)
        ):
            return factory(tuple(args), **kwargs)
        return factory(*args, **kwargs)

    return call


CHECKPOINT = torch.utils.checkpoint.checkpoint
_EMPTY_CELL = object()


def _cell_value(cell) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # not yet assigned
        return _EMPTY_CELL


def _equal_constants(new, old) -> bool:
    """Two equal numbers, strings or bools: rebinding a name to the same constant changes nothing."""
    constants = (bool, int, float, str, type(None))
    return isinstance(new, constants) and isinstance(old, constants) and new == old


def _script_traced(scripted):
    """A ``@torch.jit.script`` function that runs its Python original on traced values."""

    def call(*args, **kwargs):
        if next(_proxies_in([*args, *kwargs.values()]), None) is None:
            return scripted(*args, **kwargs)
        return scripted._torchdynamo_inline(*args, **kwargs)

    return call


DATA_FACTORIES = ("tensor", "as_tensor", "scalar_tensor")
_TENSOR = torch.tensor  # torch.tensor itself, which tracing replaces


def _data_traced(factory):
    """``torch.tensor(data)`` where ``data`` holds a traced value (a size, a list of sizes): one
    node calling the factory itself, so stage code reads ``torch.tensor(size_1, dtype=...)``."""

    def call(data, *args, **kwargs):
        proxy = next(_proxies_in(data), None)
        if proxy is None:
            return factory(data, *args, **kwargs)
        return proxy.tracer.create_proxy("call_function", factory, (data, *args), kwargs)

    return call


def _proxies_in(value):
    if isinstance(value, fx.Proxy):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _proxies_in(item)


def _is_sizes(proxy: fx.Proxy) -> bool:
    """Whether ``proxy`` is a whole size (``x.shape``, ``x.shape[:-1] + (1,)``), not one int."""
    return _is_sizes_node(proxy.node) or isinstance(_value_if_known(proxy), (tuple, list))


def _is_sizes_node(node: fx.Node) -> bool:
    """A shape, a slice of one, or one joined with a tuple, from how the node was made: for values
    meta tensors cannot compute (a CPU tensor made without ``device=`` beside meta ones)."""
    if _is_whole_shape(node):
        return True
    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[1], slice):
        return isinstance(node.args[0], fx.Node) and _is_sizes_node(node.args[0])
    if node.target is operator.add:
        return any(isinstance(a, tuple) or (isinstance(a, fx.Node) and _is_sizes_node(a)) for a in node.args)
    return False


def _is_whole_shape(node: fx.Node) -> bool:
    """``x.shape`` or ``x.size()``: a torch.Size, not one int."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] == "shape"
    return node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs


def _plain_tensors_as_buffers(root: nn.Module) -> None:
    """Make each plain tensor attribute of the (meta) model a buffer that is not saved: fx proxies
    buffers, so ``self.mask[:T, :T]`` with a traced ``T`` is a node; the stage module holds the
    attribute as such a buffer too (``runtime.stage.StageModule``)."""
    for module in root.modules():
        for name, value in plain_tensor_attributes(module):
            delattr(module, name)
            module.register_buffer(name, value, persistent=False)


def _model_namespaces(root: nn.Module) -> list[dict]:
    """The global namespaces of the model's own code: where its modules' forwards are defined,
    torch's left out."""
    found = {}
    for module in root.modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue  # compiled TorchScript: no Python code of the model's
        namespace = getattr(type(module).forward, "__globals__", None)
        if namespace is not None and not namespace.get("__name__", "").startswith("torch"):
            found[id(namespace)] = namespace
    return list(found.values())


SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})


def _is_shape_arithmetic(node: fx.Node) -> bool:
    """A node that reads a shape or does arithmetic or comparison on Python values: pure."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.op == "call_function":
        return getattr(node.target, "__module__", None) in ("_operator", "operator") or node.target is getattr
    return False


@contextmanager
def _replaced(owner, name: str, value):
    """``owner.name`` (``owner[name]`` where ``owner`` is a dict) is ``value`` for the duration; then
    what it was, or nothing where it was not there."""
    is_dict = isinstance(owner, dict)
    old = (owner if is_dict else vars(owner)).get(name, _ABSENT)
    _put(owner, name, value, is_dict)
    try:
        yield
    finally:
        _put(owner, name, old, is_dict)


def _put(owner, name: str, value, is_dict: bool) -> None:
    if value is _ABSENT and is_dict:
        owner.pop(name, None)
    elif value is _ABSENT:
        delattr(owner, name)
    elif is_dict:
        owner[name] = value
    else:
        setattr(owner, name, value)


# What fx (nn.Module's call and attribute access) and this tracer (grad mode) replace while tracing.
_ORIGINALS = (
    (nn.Module, "__call__", _MODULE_CALL),
    (nn.Module, "__getattr__", _MODULE_GETATTR),
    (nn.Module, "__setattr__", _MODULE_SETATTR),
    (nn.Module, "named_parameters", _NAMED_PARAMETERS),
    (nn.Module, "parameters", _PARAMETERS),
    (torch._C, "_set_grad_enabled", _SET_GRAD_ENABLED),
    (AUTOCAST, "__enter__", _AUTOCAST_ENTER),
    (AUTOCAST, "__exit__", _AUTOCAST_EXIT),
)


@contextmanager
def _untraced():
    """The originals of what tracing replaces, for the duration: computing a value on meta tensors
    records nothing in the graph."""
    with ExitStack() as originals:
        for owner, name, original in _ORIGINALS:
            originals.enter_context(_replaced(owner, name, original))
        yield


def _unflatten_output(graph: fx.Graph) -> None:
    """The output as forward returns it, where fx's pytree code generation holds it flattened."""
    out_spec = getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None)
    if out_spec is None:
        return
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    output.args = (pytree.tree_unflatten(list(output.args[0]), out_spec),)


def _erase_constant_inputs(graph: fx.Graph, given: set[str], constant: set[str]) -> None:
    """Erase the placeholders fx makes for the ``constant`` inputs (``mask_1``; ``extra_1``,
    ``extra_2`` for a tuple), with the checks it hangs on them (``_assert_is_none``,
    ``torch._assert(x == value)``): the model's code saw the constant, not the placeholder, so
    nothing else reads them."""
    constants = [
        n
        for n in graph.nodes
        if n.op == "placeholder" and n.target not in given and n.target.rsplit("_", 1)[0] in constant
    ]
    doomed, stack = set(), list(constants)
    while stack:
        node = stack.pop()
        if node not in doomed:
            doomed.add(node)
            stack.extend(node.users)
    for node in reversed(list(graph.nodes)):
        if node in doomed:
            graph.erase_node(node)
