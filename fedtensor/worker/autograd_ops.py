"""Worker operations for PySyft-style training on pointers: grad mode, tuples, autograd.

Like ``fedtensor.local_update``, these are operations of fedtensor's own that a command
names by a string (see :data:`fedtensor.protocol.ops.WORKER_OPERATIONS`); none of them
runs anything a client sends, only operations on the same allow-list as single
commands.

- ``fedtensor.no_grad(op, *args, **kwargs)`` runs the allow-listed operation ``op``
  with autograd off: a client sends an operation this way when it was called inside the
  client's ``torch.no_grad()`` (``w -= lr * w.grad``, an optimizer's step), so the
  client's grad mode reaches the worker with each operation it encloses.
- ``fedtensor.element(values, index)`` is one element of a tuple or list a multi-output
  operation stored (``torch.split``, ``max(dim=...)``): the client gives each element
  an id of its own, so each is usable at once, without a round trip.
- ``fedtensor.autograd_grad(outputs, inputs, ...)`` is ``torch.autograd.grad`` on the
  worker's tensors (the generic autograd entry points stay off the allow-list).
- ``fedtensor.checked(*results, value)`` is ``value``, or the failure of the first of
  ``results`` that failed: a fetch that checks unawaited ``backward()`` results on its way.
- ``fedtensor.set_attribute(tensor, name, value)`` sets a tensor's ``grad``, ``data`` or
  ``requires_grad``: what ``p.grad = None`` (an optimizer's ``zero_grad``) and
  ``p.data = ...`` do on a remote model's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedtensor.errors import ForbiddenOperation
from fedtensor.protocol.ops import OPERATIONS

__all__ = [
    "SETTABLE_ATTRIBUTES",
    "autograd_grad",
    "checked",
    "element",
    "no_grad_operation",
    "set_attribute",
]

#: The tensor attributes ``fedtensor.set_attribute`` sets.
SETTABLE_ATTRIBUTES = frozenset({"grad", "data", "requires_grad"})


def no_grad_operation(
    worker_operations: Mapping[str, Callable[..., Any]],
) -> Callable[..., Any]:
    """``fedtensor.no_grad`` for a worker whose own operations are ``worker_operations``."""

    def no_grad(op: str, *args: Any, **kwargs: Any) -> Any:
        func = OPERATIONS.get(op) if type(op) is str else None
        if func is None and op in (
            "fedtensor.element",
            "fedtensor.autograd_grad",
            "fedtensor.checked",
            "fedtensor.set_attribute",
        ):
            func = worker_operations.get(op)
        if func is None:
            raise ForbiddenOperation("ForbiddenOperation", f"operation {op!r} is not allowed", "?")
        with torch.no_grad():
            return func(*args, **kwargs)

    return no_grad


def element(values: Any, index: Any) -> Any:
    """Element ``index`` of the tuple or list ``values`` (a multi-output result)."""
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"fedtensor.element takes a tuple or list, not {type(values).__name__}")
    if type(index) is not int:
        raise TypeError(f"fedtensor.element takes an int index, not {type(index).__name__}")
    return values[index]


def autograd_grad(
    outputs: Any,
    inputs: Any,
    grad_outputs: Any = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    only_inputs: bool = True,
    allow_unused: bool | None = None,
    is_grads_batched: bool = False,
    materialize_grads: bool = False,
) -> tuple[Any, ...]:
    """``torch.autograd.grad`` (without batched gradients) on the worker's tensors."""
    del only_inputs  # deprecated in torch, and ignored by it
    if is_grads_batched:
        raise ValueError("fedtensor.autograd_grad does not take batched gradients")
    return tuple(
        torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=grad_outputs,
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=allow_unused,
            materialize_grads=materialize_grads,
        )
    )


def checked(*values: Any) -> Any:
    """The last of ``values``: a command that fails if any of the others failed.

    What a client's fetch reads behind the results of ``backward()`` calls nothing
    awaited, so that their failure is reported without a round trip of its own.
    """
    return values[-1]


def set_attribute(tensor: Any, name: Any, value: Any) -> None:
    """``tensor.<name> = value`` for ``name`` in :data:`SETTABLE_ATTRIBUTES`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"fedtensor.set_attribute takes a tensor, not {type(tensor).__name__}")
    if name not in SETTABLE_ATTRIBUTES:
        raise ValueError(
            f"fedtensor.set_attribute sets {', '.join(sorted(SETTABLE_ATTRIBUTES))}, not {name!r}"
        )
    if name == "data" and (
        not isinstance(value, torch.Tensor)
        or value.shape != tensor.shape
        or value.dtype != tensor.dtype
    ):
        # Same shape and dtype only (PySyft's `w.data = w.data - lr * w.grad`): new data of
        # another size would keep memory the client's budget charged to another object.
        raise ValueError(
            "fedtensor.set_attribute sets data to a tensor of the same shape and dtype "
            f"({tuple(tensor.shape)}, {tensor.dtype})"
        )
    setattr(tensor, name, value)
