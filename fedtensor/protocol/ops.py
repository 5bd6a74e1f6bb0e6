"""The allow-list: the only operations a worker will run, by name.

A worker never evaluates code it receives. A command names an operation by a
string (``"torch.add"``, ``"Tensor.sum"``, ``"torch.nn.functional.relu"``,
``"Tensor.grad"``) and the worker looks that string up in :data:`OPERATIONS`, a
table built once at import from torch's own list of tensor operations
(``torch.overrides.get_overridable_functions``: the functions and methods that
take tensors), minus everything on :data:`_DENIED`. A name not in the table is
refused with :class:`~fedtensor.ForbiddenOperation`.

fedtensor adds a few operations of its own (:data:`WORKER_OPERATIONS`): reading a
data set the worker holds, and a local training update that runs a traced
model (a plan, :mod:`fedtensor.protocol.plan`) whose every operation is checked against
this same table.

Denied are operations that touch files, processes or pickling (``torch.load``
and ``save`` are not tensor operations, so they never enter the table; the
denylist is for the tensor methods that reach storage, raw pointers, other
processes or Python objects), that expose uninitialised memory (which may hold
another client's data), or that take callables or hooks. Private names are
denied, except the operator dunders (``__add__`` and friends).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional

__all__ = [
    "ATTRIBUTES",
    "FUNCTION_NAMES",
    "OPERATIONS",
    "WORKER_OPERATIONS",
    "allowed_operations",
    "is_allowed",
]

# Tensor methods and functions that are tensor operations in torch's eyes but must
# never run on a worker. Each group says why.
_DENIED = frozenset(
    {
        # storage, raw memory, other processes, foreign memory protocols
        "storage", "untyped_storage", "storage_offset", "storage_type",
        "data_ptr", "const_data_ptr",
        "set_", "share_memory_", "is_shared", "pin_memory", "is_pinned", "record_stream",
        "as_strided", "as_strided_", "as_strided_scatter", "numpy",
        "__dlpack__", "__dlpack_device__", "__array__", "__array_wrap__",
        "to_dlpack", "from_dlpack", "__cuda_array_interface__", "module_load",
        # pickling and copying protocol
        "__reduce_ex__", "__reduce__", "__setstate__", "__getstate__", "__deepcopy__",
        # uninitialised memory: may show the bytes of a freed tensor of another client
        "new_empty", "new_empty_strided", "resize_", "resize_as_", "empty_like",
        # callables and hooks
        "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
        # formatting and host-side conversions that return Python objects of other kinds
        "__repr__", "__format__", "__reversed__", "__array_priority__",
    }
)  # fmt: skip

# Operator dunders a pointer forwards; every other private name is denied.
_OPERATOR_DUNDERS = frozenset(
    {
        "__abs__", "__add__", "__and__", "__div__", "__eq__", "__floordiv__", "__ge__",
        "__getitem__", "__gt__", "__iadd__", "__iand__", "__idiv__", "__ifloordiv__",
        "__ilshift__", "__imod__", "__imul__", "__invert__", "__ior__", "__ipow__",
        "__irshift__", "__isub__", "__itruediv__", "__ixor__", "__le__", "__lshift__",
        "__lt__", "__matmul__", "__mod__", "__mul__", "__ne__", "__neg__", "__or__",
        "__pos__", "__pow__", "__radd__", "__rand__", "__rdiv__", "__rfloordiv__",
        "__rlshift__", "__rmatmul__", "__rmod__", "__rmul__", "__ror__", "__rpow__",
        "__rrshift__", "__rshift__", "__rsub__", "__rtruediv__", "__rxor__",
        "__setitem__", "__sub__", "__truediv__", "__xor__",
    }
)  # fmt: skip

# Tensor attributes a pointer can read remotely (each gives a new pointer).
ATTRIBUTES: frozenset[str] = frozenset({"grad", "data", "T", "mT", "H", "mH", "real", "imag"})

_NAMESPACES: tuple[tuple[str, Any], ...] = (
    ("torch", torch),
    ("torch.nn.functional", torch.nn.functional),
    ("torch.linalg", torch.linalg),
    ("torch.fft", torch.fft),
    ("torch.special", torch.special),
)


def _allowed_name(name: str) -> bool:
    if name in _DENIED:
        return False
    return not name.startswith("_") or name in _OPERATOR_DUNDERS


def _build() -> tuple[dict[str, Callable[..., Any]], dict[Any, str]]:
    overridable = torch.overrides.get_overridable_functions()
    operations: dict[str, Callable[..., Any]] = {}
    names: dict[Any, str] = {}
    for prefix, module in _NAMESPACES:
        candidates = set(overridable.get(module, ()))
        if module is torch:
            # torch.functional's functions (einsum, split, ...) are exported as torch.*
            candidates |= set(overridable.get(torch.functional, ()))
        for attr in sorted(dir(module)):
            func = getattr(module, attr, None)
            if callable(func) and func in candidates and _allowed_name(attr):
                qualified = f"{prefix}.{attr}"
                operations[qualified] = func
                names.setdefault(func, qualified)
    tensor_methods = set(overridable[torch.Tensor])
    for attr in sorted(dir(torch.Tensor)):
        func = getattr(torch.Tensor, attr, None)
        if attr in ATTRIBUTES or not _allowed_name(attr) or not callable(func):
            continue
        if func not in tensor_methods:
            continue
        qualified = f"Tensor.{attr}"
        operations[qualified] = func
        names.setdefault(func, qualified)
    for attr in ATTRIBUTES:
        operations[f"Tensor.{attr}"] = operator.attrgetter(attr)
    return operations, names


#: Operation name -> the callable a worker runs for it.
#: ``Tensor.<attribute>`` entries read an attribute of their one argument.
OPERATIONS: dict[str, Callable[..., Any]]
#: The callable torch hands ``__torch_function__`` -> its operation name.
FUNCTION_NAMES: dict[Any, str]
OPERATIONS, FUNCTION_NAMES = _build()


#: Operations of fedtensor's own, which a worker binds to itself
#: (:class:`fedtensor.worker.actor.WorkerActor`): a data set it holds, and a local
#: training update (:mod:`fedtensor.worker.local_update`). Plans cannot call them.
WORKER_OPERATIONS: frozenset[str] = frozenset({"fedtensor.dataset", "fedtensor.local_update"})


def is_allowed(name: str) -> bool:
    """Whether a worker runs the operation called ``name``."""
    return name in OPERATIONS or name in WORKER_OPERATIONS


def allowed_operations() -> list[str]:
    """The sorted names of every operation a worker runs."""
    return sorted({*OPERATIONS, *WORKER_OPERATIONS})
