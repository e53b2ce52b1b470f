"""What an inference program returns: forward's outputs, per micro-batch and joined into batches.

A program compiled with ``--schedule forward-only`` returns from its last stage what the model's
forward returns (a tensor, or tuples, lists and dicts of them; a dataclass or named tuple as a
dict of its fields). Its leaves are named by their path, ``output[0]`` or ``output['logits']``,
in program.json, in the stage file's docstring and in ``ppcompile verify``'s lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ppcompile.runtime.spec import SpecError, loss_of


def output_leaves(structure, path: str = "output") -> list[tuple[str, object]]:
    """Every leaf of ``structure`` with its path, in a fixed order (a dict's in its own).

    >>> [p for p, _ in output_leaves({"logits": 1, "hidden": (2, 3)})]
    ["output['logits']", "output['hidden'][0]", "output['hidden'][1]"]
    """
    if isinstance(structure, Mapping):
        items = list(structure.items())
    elif _is_record(structure):
        items = list(_fields(structure).items())
    elif isinstance(structure, (tuple, list)):
        items = list(enumerate(structure))
    else:
        return [(path, structure)]
    return [leaf for key, value in items for leaf in output_leaves(value, f"{path}[{key!r}]")]


def _is_record(value) -> bool:
    """A dataclass instance or a named tuple: the program returns either as a dict of its fields."""
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or (
        isinstance(value, tuple) and hasattr(value, "_fields")
    )


def _fields(value) -> dict:
    if isinstance(value, tuple):
        return dict(zip(value._fields, value))
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def as_returned(structure):
    """``structure`` as an inference program returns it: records as dicts of their fields."""
    if isinstance(structure, Mapping):
        return {k: as_returned(v) for k, v in structure.items()}
    if _is_record(structure):
        return {k: as_returned(v) for k, v in _fields(structure).items()}
    if isinstance(structure, (tuple, list)):
        return type(structure)(as_returned(v) for v in structure)
    return structure


def loss_in(output) -> torch.Tensor | None:
    """The scalar loss an inference program's output holds, picked by the rule training picks it
    by (:func:`ppcompile.runtime.spec.loss_of`), or None where it holds none or the value picked is
    not a 0-d floating tensor.

    >>> loss_in((torch.tensor(0.5), torch.zeros(2)))
    tensor(0.5000)
    >>> loss_in({"logits": torch.zeros(2)}) is None
    True
    """
    try:
        loss = loss_of(output)
    except SpecError:  # a dict without "loss", an empty tuple
        return None
    if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point():
        return loss
    return None


def joined(per_microbatch: list, batch_dims: dict[str, int | None]):
    """One batch's output from its micro-batches' (in order): each tensor leaf concatenated along
    its batch dim (``batch_dims`` by path), a leaf without one (a loss, a shared table) as the list
    of the micro-batches' values.

    >>> joined([(torch.zeros(2, 3), 1.0), (torch.ones(2, 3), 2.0)], {"output[0]": 0, "output[1]": None})
    (tensor([[0., 0., 0.],
            [0., 0., 0.],
            [1., 1., 1.],
            [1., 1., 1.]]), [1.0, 2.0])
    """

    def join(parts: list, path: str):
        first = parts[0]
        if isinstance(first, Mapping):
            return {k: join([p[k] for p in parts], f"{path}[{k!r}]") for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(join([p[i] for p in parts], f"{path}[{i!r}]") for i in range(len(first)))
        dim = batch_dims.get(path)
        if isinstance(first, torch.Tensor) and dim is not None:
            return torch.cat(parts, dim)
        return list(parts)

    return join([as_returned(o) for o in per_microbatch], "output")
