"""The base class of every generated stage module.

A generated ``stage_<i>.py`` lists the leaf submodules and the parameters/buffers it
uses under the model's own names; the constructor adopts exactly those from a model
instance, so ``state_dict()`` keys are the original FQNs and any checkpoint written in
the model's own names loads into any partition.

Example::

    model = GPT(config)          # built from the same factory and seed as at compile time
    stage = Stage1(model)        # holds transformer.h.2..3 and lm_head, nothing else
    stage.state_dict().keys()    # 'transformer.h.2.ln_1.weight', ...
"""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import torch
from torch import nn

from ppcompile.runtime.spec import MODEL_FILE


def plain_tensor_attributes(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors ``module`` holds as plain attributes (``self.mask = torch.tril(...)`` in
    ``__init__``), neither parameters nor buffers: a stage holds them as buffers not saved."""
    return [
        (name, value)
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
    ]


class Container(nn.Module):
    """An intermediate module on the path to an adopted leaf; ``h[2]`` reads attribute ``"2"``."""

    def __getitem__(self, index: int) -> nn.Module:
        return getattr(self, str(index))

    def forward(self, *args, **kwargs):  # pragma: no cover - containers are never called
        raise RuntimeError("a Container only holds submodules")


def function_attribute(ref: str) -> str:
    """``"<model>:Outer.GradReverse"`` -> ``Outer_GradReverse``, the name stage code calls it by."""
    return ref.partition(":")[2].replace(".", "_")


def resolve_function(ref: str, model: nn.Module) -> type:
    """The ``torch.autograd.Function`` named ``module:qualname``; module ``<model>`` is the model's
    own file, found through the modules the model's classes are defined in."""
    module_name, _, qualname = ref.partition(":")
    if module_name == MODEL_FILE:
        homes = [sys.modules.get(type(m).__module__) for m in model.modules()]
    else:
        homes = [importlib.import_module(module_name)]
    for home in dict.fromkeys(h for h in homes if h is not None):
        found = home
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if isinstance(found, type) and issubclass(found, torch.autograd.Function):
            return found
    raise RuntimeError(
        f"stage code calls {qualname}.apply, which the model's files no longer define; recompile"
    )


class StageModule(nn.Module):
    MODULES: tuple[str, ...] = ()  # leaf submodules this stage calls, by FQN
    TENSORS: tuple[str, ...] = ()  # parameters and buffers it reads directly, by FQN
    FUNCTIONS: tuple[str, ...] = ()  # custom autograd.Functions it calls, as "module:qualname"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.functions = SimpleNamespace(
            **{function_attribute(ref): resolve_function(ref, model) for ref in self.FUNCTIONS}
        )
        for fqn in self.MODULES:
            parent, name = self._parent_of(fqn)
            if name not in parent._modules:
                parent.add_module(name, model.get_submodule(fqn))
        for fqn in self.TENSORS:
            owner_path, _, name = fqn.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            parent, _ = self._parent_of(fqn)
            if name in parent._parameters or name in parent._buffers:
                continue
            if name in owner._parameters:
                parent.register_parameter(name, owner._parameters[name])
            elif name in owner._buffers:
                persistent = name not in owner._non_persistent_buffers_set
                parent.register_buffer(name, owner._buffers[name], persistent=persistent)
            else:  # a plain tensor attribute (self.mask = torch.tril(...)): held, never saved
                parent.register_buffer(name, getattr(owner, name), persistent=False)

    def _parent_of(self, fqn: str) -> tuple[nn.Module, str]:
        """The (created on demand) container that holds the last component of ``fqn``."""
        *path, name = fqn.split(".")
        module: nn.Module = self
        for part in path:
            if part not in module._modules:
                module.add_module(part, Container())
            module = module._modules[part]
        return module, name
