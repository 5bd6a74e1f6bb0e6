"""Plans as data: the wire form of a model's training step, and the limits on it.

A worker never receives Python code, so a user's ``torch.nn.Module`` cannot
travel as itself. Instead the client traces it once
(:mod:`fedtensor.federated.trace`, with :mod:`torch.fx`) into a *plan*: the
straight-line graph of tensor operations its forward pass and loss perform,
written as plain wire values (lists, strings, numbers, tensors). The worker
checks it (:mod:`fedtensor.worker.compiler`) against the same allow-list that
guards single commands (:mod:`fedtensor.protocol.ops`) and then runs it once per
batch, with autograd, on its own copy of the model's state
(:mod:`fedtensor.worker.local_update`). PySyft 0.2 had the same idea under the
same name.

This module is what both sides agree on, and neither side's machinery: the
format, the grammar below, the limits a worker holds a plan to, and which
callables a plan's ``call`` nodes may name (:func:`operation`), so that the
tracer refuses, while tracing, exactly what a worker would refuse.

The wire form of a plan is a dict::

    {"format": 1, "nodes": [node, ...], "trainable": [key, ...]}
    node := ["input", position, (), {}]          # x is input 0, y is input 1
          | ["state", key, (), {}]               # an entry of the state dict
          | ["value", None, (tensor,), {}]       # a constant tensor of the model
          | ["call", operation, args, kwargs]    # an allow-listed operation
          | ["output", None, (outputs,), {}]     # (loss, model output)

where ``Ref(i)`` inside ``args`` and ``kwargs`` stands for the value of node ``i``,
which comes before it. ``operation`` is a name of :data:`fedtensor.protocol.ops.OPERATIONS`,
of :data:`OPERATORS` (Python's operators on sizes, ``x.size(0) * 2``), of
:data:`FACTORIES`, or ``"getattr"`` with an attribute of :data:`ATTRIBUTES`.
State entries are named by the model's ``state_dict`` keys; ``trainable`` lists
those a local update trains.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from fedtensor.errors import PlanError
from fedtensor.protocol import ops as _ops

__all__ = [
    "ATTRIBUTES",
    "FACTORIES",
    "FORMAT",
    "MAX_INT_BITS",
    "MAX_NODES",
    "MAX_SEQUENCE",
    "OPERATORS",
    "OPTIMIZERS",
    "operation",
    "plan_getattr",
]

FORMAT = 1
#: More nodes than this is not a model a worker agreed to run.
MAX_NODES = 100_000

#: Python ints, and tuples or lists, that a plan's operators make stay this small: on
#: plain Python objects, ``2 ** 10**9`` or a list doubled at every node would hold the
#: worker's interpreter (and every client's event loop with it) for minutes.
MAX_INT_BITS = 4096
MAX_SEQUENCE = 4096

#: The optimizers a local update builds, by name (``fedtensor.local_update``'s
#: ``optimizer`` argument): a client checks its choice before a round, a worker on use.
OPTIMIZERS = ("sgd", "adam")


def _bounded(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` on Python operands only when neither operands nor result are huge.

    Tensors pass through untouched (their operations are bounded by their sizes).
    """

    def checked(*operands: Any) -> Any:
        for operand in operands:
            if type(operand) is int and operand.bit_length() > MAX_INT_BITS:
                raise PlanError(f"a plan's Python ints stay within {MAX_INT_BITS} bits")
            if isinstance(operand, (str, bytes)):
                raise PlanError("a plan's operators take tensors and numbers, not strings")
        if (
            function is operator.pow
            and all(type(o) is int for o in operands)
            and not 0 <= operands[1] <= 64
        ):
            raise PlanError("a plan raises Python ints to powers from 0 to 64 only")
        if function is operator.mul and any(isinstance(o, (tuple, list)) for o in operands):
            count = next((o for o in operands if type(o) is int), 0)
            sequence = next(o for o in operands if isinstance(o, (tuple, list)))
            if count * len(sequence) > MAX_SEQUENCE:
                raise PlanError(f"a plan's sequences stay within {MAX_SEQUENCE} items")
        result = function(*operands)
        if type(result) is int and result.bit_length() > MAX_INT_BITS:
            raise PlanError(f"a plan's Python ints stay within {MAX_INT_BITS} bits")
        if isinstance(result, (tuple, list)) and len(result) > MAX_SEQUENCE:
            raise PlanError(f"a plan's sequences stay within {MAX_SEQUENCE} items")
        return result

    return checked


#: Python operators fx records between tensors and sizes (``x.size(0) * 2``), by name.
#: Comparisons and getitem cannot grow anything; arithmetic is bounded on Python operands.
OPERATORS: dict[str, Callable[..., Any]] = {
    **{
        f"operator.{name}": getattr(operator, name)
        for name in ("eq", "ne", "lt", "le", "gt", "ge", "getitem", "not_", "neg", "pos", "abs")
    },
    **{
        f"operator.{name}": _bounded(getattr(operator, name))
        for name in (
            "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_",
        )
    },
}  # fmt: skip
#: Attributes a plan may read with ``getattr`` (fx records ``x.shape`` that way).
ATTRIBUTES = frozenset(
    {"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "is_nested", "requires_grad"}
)
#: Factories a plan may call (a recurrent layer's zero state), though a single command
#: cannot: they take no tensor, so there is no pointer to send them with. Their
#: memory is initialised.
FACTORIES: dict[str, Callable[..., Any]] = {
    f"torch.{name}": getattr(torch, name) for name in ("zeros", "ones", "full", "arange", "eye")
}


def plan_getattr(value: Any, name: str) -> Any:
    """What a ``["call", "getattr", (value, name), {}]`` node runs (``name`` in ATTRIBUTES)."""
    return getattr(value, name)


def operation(name: object) -> Callable[..., Any] | None:
    """The callable a plan's ``call`` node named ``name`` runs, or ``None`` if it may not.

    ``"getattr"`` is not among them: it is allowed per attribute (:data:`ATTRIBUTES`).
    """
    if not isinstance(name, str):
        return None
    return OPERATORS.get(name) or FACTORIES.get(name) or _ops.OPERATIONS.get(name)
