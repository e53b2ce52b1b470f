"""What a model file hands to ppcompile: the module, one micro-batch of inputs, and its symbolic dims.

A model file exposes factories. A factory returns either ``(module, example_inputs)`` or a
:class:`ModelSpec` when it needs to say more; the example inputs are a tuple of forward's first
inputs or a dict by name. ``module(*example_inputs)`` returns the scalar loss,
or holds it as users' models do (:func:`loss_of`): ``(loss, logits)``, ``{"loss": loss, ...}``.

This module lives in the runtime because both halves need it: the compiler traces the
module, and each rank rebuilds the same module from the same factory to get its weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


def loss_of(returned, float_shape=None):
    """The loss in what a model's forward returned: the value itself, unless it is a mapping
    (a dict, a Hugging Face ``ModelOutput``), then its ``"loss"``; a dataclass or named tuple
    with a ``loss`` field, then that field; or a tuple or list, then its first element, unless
    that is no one-element tensor and exactly one other element is a 0-d floating tensor
    (nanoGPT's ``return logits, loss``), then that one. The compiler picks the loss out of the
    traced graph's output by this rule, telling shapes by ``float_shape`` (a value's shape if it
    is a floating tensor, else None), and the eager reference out of the model's, so both train on
    the same value.

    >>> loss_of((torch.tensor(2.0), torch.zeros(3)))
    tensor(2.)
    >>> loss_of((torch.zeros(3), torch.tensor(2.0)))
    tensor(2.)
    >>> loss_of({"logits": torch.zeros(3), "loss": torch.tensor(1.5)})
    tensor(1.5000)
    """
    if isinstance(returned, Mapping):
        if "loss" not in returned:
            raise SpecError(
                f"forward returned a mapping with keys {', '.join(map(repr, returned))} and no 'loss'; "
                "return the loss, or put it under 'loss'"
            )
        return returned["loss"]
    if "loss" in getattr(returned, "_fields", ()) or (
        dataclasses.is_dataclass(returned) and "loss" in {f.name for f in dataclasses.fields(returned)}
    ):
        return returned.loss
    if isinstance(returned, (tuple, list)):
        if not returned:
            raise SpecError("forward returned an empty tuple; return the loss, or (loss, ...)")
        return returned[loss_position(returned, float_shape or floating_shape)]
    return returned


def loss_position(items, float_shape) -> int:
    """Where :func:`loss_of` finds the loss in a returned tuple or list ``items``."""
    first = float_shape(items[0])
    if first is not None and all(size == 1 for size in first):
        return 0
    scalars = [i for i, item in enumerate(items[1:], 1) if float_shape(item) == ()]
    return scalars[0] if len(scalars) == 1 else 0


def floating_shape(value) -> tuple | None:
    """``value``'s shape if it is a floating tensor, else None."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) and value.is_floating_point() else None


# The name a model file is imported under starts with this; the rest depends on where the file
# lies, so generated code names the model file's own definitions by MODEL_FILE instead.
MODEL_MODULE_PREFIX = "ppc_model_"
MODEL_FILE = "<model>"


@dataclass(frozen=True)
class ModelSpec:
    """A model plus what the compiler cannot guess from it.

    Example::

        ModelSpec(model, (idx, targets), dims={"idx": {0: "b", 1: "s"}, "targets": {0: "b", 1: "s"}})
        ModelSpec(model, {"input_ids": ids, "labels": ids})  # as model(**batch) takes them
    """

    module: nn.Module
    # One micro-batch: forward's first inputs in order, or inputs by name, as model(**batch) takes
    # them (inputs left out take forward's defaults). :func:`as_spec` makes either a tuple in
    # forward's order, named by ``input_names``. The batch dim of an input is the one ``dims``
    # names "b" (dim 0 by default).
    example_inputs: tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]
    # input name -> {dim index -> symbol}; inputs not named here get {0: "b"}.
    dims: dict[str, dict[int, str]] = field(default_factory=dict)
    # Optional: called as data(batch_size, seed) -> iterator of full batches, each a tuple like the
    # example inputs or a dict by name.
    data: Callable[[int, int], Iterator[tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]]] | None = None
    # The names of forward's inputs the example inputs give, in forward's order (set by as_spec).
    # An input given as a dict, list, tuple or named tuple of tensors (``forward(self, batch)``,
    # ``batch["x"]``, ``x, y = batch`` or ``batch.x``) counts as one input per entry, named
    # ``batch_x`` or ``batch_0``, as ``dims`` names them.
    input_names: tuple[str, ...] = ()
    # Per forward input given as a dict, list, tuple or named tuple of tensors: its name, its keys
    # (indices for a list or tuple, fields for a named tuple) in order, and its kind: "dict",
    # "list", "tuple", or the named tuple's class (set by as_spec).
    input_groups: tuple[tuple[str, tuple, str | type], ...] = ()
    # Every input forward takes by name, "**" last where it takes any keyword (set by as_spec): what
    # a data function's batch may give that the example leaves out (inputs_left_out), known on a
    # rank that keeps its own stages and drops the module.
    forward_inputs: tuple[str, ...] = ()
    # forward's inputs the example gives as None (``model(x, None, y)``, a mask left off): the
    # program is compiled with them None, as forward's defaults are, and every batch must give None
    # there too (set by as_spec).
    none_inputs: tuple[str, ...] = ()


def as_spec(made: ModelSpec | tuple) -> ModelSpec:
    """Normalise what a factory returned into a ModelSpec whose example inputs are a tuple in
    forward's order, named by its ``input_names``."""
    if isinstance(made, ModelSpec):
        spec = made
    elif isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        spec = ModelSpec(module=made[0], example_inputs=made[1])
    else:
        raise TypeError(
            f"a factory must return (module, example_inputs) or a ModelSpec, got {type(made).__name__}"
        )
    names, inputs = _forward_inputs(spec.module, spec.example_inputs)
    none_inputs = tuple(name for name, value in zip(names, inputs) if value is None)
    kept = [i for i, value in enumerate(inputs) if value is not None]
    names, inputs = tuple(names[i] for i in kept), tuple(inputs[i] for i in kept)
    groups = tuple(
        (name, tuple(value), "dict")
        if isinstance(value, Mapping)
        else (name, value._fields, type(value))
        if _is_named_tuple(value)
        else (name, tuple(range(len(value))), type(value).__name__)
        for name, value in zip(names, inputs)
        if _is_tensor_group(value)
    )
    for name, keys, _ in groups:
        odd = [
            key
            for key in keys
            if not isinstance(key, int) and not (isinstance(key, str) and key.isidentifier())
        ]
        if odd:
            raise SpecError(
                f"example input {name!r} is a dict with keys {', '.join(map(repr, odd))}; each entry "
                f"becomes an input named {name}_KEY, so its keys must be Python names"
            )
    flat_names, flat_inputs = flatten_inputs(names, inputs, groups)
    taken = [n for n in flat_names if flat_names.count(n) > 1]
    if taken:
        raise SpecError(
            f"the dict inputs' entries are named as another input of forward ({taken[0]!r}); rename one"
        )
    parameters = inspect.signature(spec.module.forward).parameters.values()
    forward_inputs = tuple(
        "**" if p.kind is p.VAR_KEYWORD else p.name for p in parameters if p.kind is not p.VAR_POSITIONAL
    )
    return dataclasses.replace(
        spec,
        example_inputs=flat_inputs,
        input_names=flat_names,
        input_groups=groups,
        forward_inputs=forward_inputs,
        none_inputs=none_inputs,
    )


def batch_by_name(spec: ModelSpec, batch) -> dict:
    """A batch as a data function yields it (a tuple like the example inputs, or a dict by forward's
    input names, either holding a dict, list or named tuple input as the example does) as a dict by
    :attr:`ModelSpec.input_names`."""
    batch = _as_given(spec, batch)
    if isinstance(batch, Mapping):
        given = dict(batch)
    else:
        given = dict(zip(_given_names(spec), batch))
    for name in spec.none_inputs:
        given.pop(name, None)
    for name, keys, _ in spec.input_groups:
        group = given.get(name)
        if isinstance(group, (Mapping, list, tuple)):
            del given[name]
            given.update({f"{name}_{key}": _entry(group, key) for key in keys if _has(group, key)})
    return given


def inputs_left_out(spec: ModelSpec, batch) -> list[str]:
    """What a data function's batch gives that forward would read but the example inputs leave out
    or give as None, so the program was compiled without it (an ``attention_mask`` it would silently
    not apply): the keys of a dict batch that name forward's inputs, a tuple batch's items past the
    example's, and the inputs the example gives as None that the batch does not.

    >>> class Net(torch.nn.Module):
    ...     def forward(self, x, mask=None):
    ...         return x
    >>> spec = as_spec((Net(), (torch.zeros(2),)))
    >>> inputs_left_out(spec, {"x": torch.zeros(2), "mask": torch.ones(2)}), inputs_left_out(spec, (1, 2))
    (['mask'], ['mask'])
    """
    batch = _as_given(spec, batch)
    given = _given_names(spec)
    named = [n for n in spec.forward_inputs if n != "**"]
    takes_any = "**" in spec.forward_inputs
    by_name = batch if isinstance(batch, Mapping) else dict(zip(given, batch))
    filled = [name for name in spec.none_inputs if by_name.get(name) is not None]
    if isinstance(batch, Mapping):
        return filled + [k for k in batch if k not in given and (k in named or takes_any)]
    extra = len(batch) - len(given)
    return filled + [
        named[i] if i < len(named) else f"item {i}" for i in range(len(given), len(given) + extra)
    ]


def _as_given(spec: ModelSpec, batch):
    """``(batch,)`` where ``batch`` is the one dict forward takes (``forward(self, batch)``, the
    example ``(batch,)``), handed over bare as a data loader does; else ``batch``."""
    given = _given_names(spec)
    if not isinstance(batch, Mapping) or len(given) != 1 or given[0] in batch:
        return batch
    keys = next((keys for name, keys, kind in spec.input_groups if name == given[0] and kind == "dict"), None)
    return (batch,) if keys is not None and set(keys) <= set(batch) else batch


def _has(group, key) -> bool:
    if isinstance(group, Mapping):
        return key in group
    return key in group._fields if isinstance(key, str) else key < len(group)


def _entry(group, key):
    """``group[key]``, or a named tuple's field ``key`` by name."""
    return getattr(group, key) if isinstance(key, str) and not isinstance(group, Mapping) else group[key]


def _is_named_tuple(value) -> bool:
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def _given_names(spec: ModelSpec) -> list[str]:
    """Forward's inputs as the example gave them, in forward's order: a dict input by its own name,
    and those it gave as None."""
    first = {f"{name}_{keys[0]}": name for name, keys, _ in spec.input_groups}
    entries = {f"{name}_{key}" for name, keys, _ in spec.input_groups for key in keys}
    given = [first.get(n, n) for n in spec.input_names if n in first or n not in entries]
    if not spec.none_inputs:
        return given
    order = {name: i for i, name in enumerate(spec.forward_inputs)}
    return sorted(given + list(spec.none_inputs), key=order.__getitem__)


def _is_tensor_group(value) -> bool:
    """A non-empty dict (any mapping), list, tuple or named tuple of tensors."""
    if isinstance(value, Mapping):
        value = list(value.values())
    elif type(value) not in (list, tuple) and not _is_named_tuple(value):
        return False
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)
    )


def flatten_inputs(names, inputs, groups) -> tuple[tuple[str, ...], tuple]:
    """Forward's inputs with each dict, list, tuple or named tuple of tensors among them
    (``groups``: its name, keys and kind) as one input per entry, named ``NAME_KEY``.

    >>> flatten_inputs(["batch", "t"], [{"x": 1, "y": 2}, 3], [("batch", ("x", "y"), "dict")])
    (('batch_x', 'batch_y', 't'), (1, 2, 3))
    >>> flatten_inputs(["batch"], [[1, 2]], [("batch", (0, 1), "list")])
    (('batch_0', 'batch_1'), (1, 2))
    """
    keys_of = {name: keys for name, keys, _ in groups}
    flat_names, flat_inputs = [], []
    for name, value in zip(names, inputs):
        if name in keys_of:
            flat_names += [f"{name}_{key}" for key in keys_of[name]]
            flat_inputs += [_entry(value, key) for key in keys_of[name]]
        else:
            flat_names.append(name)
            flat_inputs.append(value)
    return tuple(flat_names), tuple(flat_inputs)


def _forward_inputs(module: nn.Module, given) -> tuple[tuple[str, ...], tuple]:
    """The names of forward's inputs ``given`` gives (a tuple of forward's first inputs, or a
    mapping by name), in forward's order, and the inputs in that order."""
    params = inspect.signature(module.forward).parameters
    if isinstance(given, Mapping):
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [name for name in given if name not in named]
        if unknown:
            which = "example input {} is not" if len(unknown) == 1 else "example inputs {} are not"
            raise SpecError(
                f"{which.format(', '.join(map(repr, unknown)))} among forward's inputs "
                f"({', '.join(named) or 'none it takes by name'})"
            )
        names = tuple(name for name in named if name in given)
        return names, tuple(given[name] for name in names)
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = tuple(given)
    if len(given) > len(positional):
        raise SpecError(
            f"forward takes {len(positional)} positional inputs but the factory gave {len(given)} "
            "example inputs"
        )
    return tuple(positional[: len(given)]), given


def call_forward(module: nn.Module, names, inputs, groups=(), nones=()):
    """``module`` run on ``inputs``, each passed by its name, so inputs forward leaves at their
    defaults may sit between them; the entries of a dict, list, tuple or named tuple input
    (``groups``: its name, keys and kind, as :class:`ModelSpec` records them) gathered into one
    again, and the inputs named in ``nones`` given as None.

    >>> call_forward(nn.Identity(), ["input"], [torch.ones(1)])
    tensor([1.])
    >>> call_forward(nn.Identity(), ["input_x"], [torch.ones(1)], [("input", ("x",), "dict")])
    {'x': tensor([1.])}
    """
    given = dict(zip(names, inputs)) | dict.fromkeys(nones)
    for name, keys, kind in groups:
        given[name] = regrouped(kind, {key: given.pop(f"{name}_{key}") for key in keys})
    return module(**given)


def regrouped(kind: str | type, entries: dict):
    """``entries`` (key -> value, in order) as the ``kind`` of container the example gave:
    ``"dict"``, ``"list"``, ``"tuple"``, or a named tuple's class.

    >>> regrouped("tuple", {0: "x", 1: "y"})
    ('x', 'y')
    """
    if isinstance(kind, type):
        return kind(**entries)
    if kind == "dict":
        return entries
    return list(entries.values()) if kind == "list" else tuple(entries.values())


class SpecError(ValueError):
    """A model reference that cannot be loaded; the message is one line for the user."""


@dataclass(frozen=True)
class ModelRef:
    """``path/to/model.py:factory`` as typed by a user."""

    path: str
    factory: str

    @staticmethod
    def parse(text: str) -> ModelRef:
        path, sep, factory = text.rpartition(":")
        if not sep or not path or not factory:
            raise SpecError(
                f"model reference {text!r} must look like PATH.py:FACTORY, e.g. models/gpt.py:gpt_mini"
            )
        return ModelRef(path, factory)

    def __str__(self) -> str:
        return f"{self.path}:{self.factory}"

    def sha256(self) -> str:
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()

    def load_factory(self) -> Callable[[], ModelSpec | tuple]:
        file = Path(self.path)
        if not file.is_file():
            raise SpecError(f"model file {self.path} does not exist")
        module_name = MODEL_MODULE_PREFIX + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(spec)
            # Registered before exec so dataclasses and pickling inside the model file resolve.
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                del sys.modules[module_name]
                raise
        factory = getattr(module, self.factory, None)
        if not callable(factory):
            known = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise SpecError(
                f"{self.path} has no factory {self.factory!r}; callables there: {', '.join(known)}"
            )
        return factory

    def build(self, device: str | torch.device = "cpu", seed: int | None = 0) -> ModelSpec:
        """Run the factory on ``device`` (``"meta"`` allocates nothing) under a fixed seed."""
        factory = self.load_factory()
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            made = factory()
        try:
            spec = as_spec(made)
        except SpecError as e:
            raise SpecError(f"{self}: {e}") from None
        return dataclasses.replace(spec, module=uncompiled(spec.module))


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every submodule ``torch.compile`` wrapped (``self.block =
    torch.compile(Block())``) replaced by the module it wraps, the model itself too: the pipeline
    runs the module's own code, and its parameters keep the names they have in it (``block.fc``,
    not ``block._orig_mod.fc``), compiling and at run time alike."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:  # nothing was compiled
        return model
    wrapped = eval_frame.OptimizedModule
    while isinstance(model, wrapped):
        model = model._orig_mod
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, wrapped):
                while isinstance(child, wrapped):
                    child = child._orig_mod
                setattr(module, name, child)
    return model
