"""The inline policy: which commands a threaded worker may run on its event loop.

Theory of operation
-------------------
A worker serving a network computes on a thread of its own, so that its event
loop stays free for I/O (pings, handshakes, other clients) while an operation
runs. Handing a batch to that thread and its replies back costs about 120
microseconds here: more than a small operation itself. So the actor
(:meth:`fedtensor.worker.actor.WorkerActor.run_inline`) runs a batch's leading
commands on the loop's thread instead, while it is idle, as long as
:func:`is_cheap` says each one surely takes microseconds; the first command that
is not cheap, and every command after it, goes to the compute thread in order.

"Cheap" is decided from what the worker already knows, before running anything:
the operation's name and the sizes of the stored tensors it reads. Allowed are
operations whose cost grows with the size of their tensor inputs and nothing
else (:data:`NAMES`: elementwise math, comparisons, reductions, views,
indexing, and products, whose work is at most the product of their inputs'
sizes), when those inputs hold at most :data:`MAX_ELEMENTS` elements multiplied
together; stores and releases; fetches of at most :data:`MAX_FETCH_BYTES` of
tensor data, or of a number or a failure; and at most :data:`MAX_COMMANDS` of
them per frame, so that a long pipelined burst still goes to the thread. Never
inline: operations whose integer arguments set the size of the result
(``repeat``, ``expand``, ``unfold``), autograd, plans, and anything nested
deeper than this accounting looks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedtensor.protocol.messages import Call, Fetch, Message, Ref, Release, Store
from fedtensor.protocol.ops import OPERATIONS
from fedtensor.worker.failed import Failed

__all__ = [
    "MAX_COMMANDS",
    "MAX_ELEMENTS",
    "MAX_FETCH_BYTES",
    "NAMES",
    "OPERATIONS_INLINE",
    "is_cheap",
]

#: Operations whose cost grows with the size of their tensor inputs and no
#: other argument: elementwise arithmetic and math, comparisons, reductions,
#: views, indexing, and products (matmul's work is at most the product of
#: its inputs' sizes). Never: operations whose integer arguments set the size
#: of the result (``repeat``, ``expand``, ``unfold``), autograd, plans.
NAMES = frozenset(
    {
        "abs", "add", "addcdiv", "addcmul", "all", "amax", "amin", "any", "argmax", "argmin",
        "bitwise_and", "bitwise_not", "bitwise_or", "bitwise_xor", "ceil", "clamp", "clip",
        "clone", "contiguous", "cos", "cumsum", "detach", "div", "dot", "double", "eq", "exp",
        "flatten", "float", "floor", "fmod", "ge", "gelu", "gt", "int", "isfinite", "isnan",
        "le", "lerp", "log", "log1p", "log_softmax", "logical_and", "logical_not",
        "logical_or", "long", "lt", "matmul", "max", "maximum", "mean", "min", "minimum",
        "mm", "mul", "mv", "ne", "neg", "norm", "permute", "pow", "prod", "reciprocal",
        "relu", "remainder", "reshape", "round", "rsqrt", "sigmoid", "sign", "silu", "sin",
        "softmax", "sqrt", "square", "squeeze", "std", "sub", "sum", "t", "tanh",
        "transpose", "true_divide", "unsqueeze", "var", "view", "where",
        "add_", "clamp_", "div_", "mul_", "sub_", "zero_", "fill_",
        "__abs__", "__add__", "__and__", "__eq__", "__floordiv__", "__ge__", "__getitem__",
        "__gt__", "__iadd__", "__imul__", "__invert__", "__isub__", "__itruediv__", "__le__",
        "__lt__", "__matmul__", "__mod__", "__mul__", "__ne__", "__neg__", "__or__",
        "__pos__", "__pow__", "__radd__", "__rmatmul__", "__rmul__", "__rpow__", "__rsub__",
        "__rtruediv__", "__setitem__", "__sub__", "__truediv__", "__xor__",
    }
)  # fmt: skip
#: The allow-list entries (``torch.add``, ``Tensor.add``, ...) that :data:`NAMES` covers.
OPERATIONS_INLINE = frozenset(name for name in OPERATIONS if name.rpartition(".")[2] in NAMES)
#: A cheap call's tensor inputs hold at most this many elements, multiplied
#: together (which bounds a broadcast result and a matrix product's work): a
#: few tens of microseconds at most.
MAX_ELEMENTS = 1 << 16
#: A cheap fetch replies with at most this many bytes of tensors.
MAX_FETCH_BYTES = 1 << 16
#: Commands run inline per frame, at most: a long pipelined burst goes to the actor.
MAX_COMMANDS = 64


def is_cheap(objects: Mapping[int, Any], message: Message) -> bool:
    """Whether ``message`` surely runs in microseconds, given the store ``objects``."""
    kind = type(message)
    if kind is Call:
        if message.op not in OPERATIONS_INLINE:  # type: ignore[union-attr]
            return False
        work = 1
        for arg in (*message.args, *message.kwargs.values()):  # type: ignore[union-attr]
            for item in arg if type(arg) is tuple or type(arg) is list else (arg,):
                value = objects.get(item) if type(item) is Ref else item
                if isinstance(value, torch.Tensor):
                    work *= max(value.numel(), 1)
                elif type(value) is tuple or type(value) is list:
                    return False  # nested deeper than cost accounting looks
        return work <= MAX_ELEMENTS
    if kind is Store or kind is Release:
        return True
    if kind is Fetch:
        value = objects.get(message.id)  # type: ignore[union-attr]
        if isinstance(value, torch.Tensor):
            # A grad travels too: only a leaf's (or a retained one) is read, as snapshot does.
            has_grad = (value.is_leaf or value.retains_grad) and value.grad is not None
            return value.nbytes <= MAX_FETCH_BYTES and not has_grad
        return value is None or type(value) in (int, float, bool, Failed)
    return False
