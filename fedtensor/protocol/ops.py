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

Most of the denylist is families, not names (:data:`_DENIED_FAMILIES`): a pattern
on the bare name (``data_ptr`` in ``Tensor.const_data_ptr``) denies every spelling
torch has and every one a later torch adds, in every namespace, where a list of
names lets through the one nobody wrote down (``as_strided_copy`` beside a denied
``as_strided``). :data:`_DENIED` keeps the names no family covers, and
:data:`_FAMILY_EXCEPTIONS` the few names a family would deny wrongly. The table
was audited by listing it whole (``ft.allowed_operations()``) against torch 2.13.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional

__all__ = [
    "ATTRIBUTES",
    "FUNCTION_NAMES",
    "OPERATIONS",
    "WORKER_FUNCTIONS",
    "WORKER_OPERATIONS",
    "allowed_operations",
    "is_allowed",
]

# Families of operations that must never run on a worker, as patterns searched in the
# bare name (the part after ``torch.``, ``Tensor.``, ...). Each says why.
_DENIED_FAMILIES: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        # Addresses of tensor memory: data_ptr, const_data_ptr, and any later spelling.
        r"data_ptr",
        # Storage objects and offsets: they reach past the view a client was given.
        r"storage",
        # Views with caller-chosen sizes, strides and offset over the whole storage of a
        # tensor, which may be a slice of a recycled buffer holding other data
        # (fedtensor.protocol.pool): as_strided, as_strided_, as_strided_copy, _scatter.
        r"^as_strided",
        # fbgemm kernels: fbgemm_pack_* return a blob that starts with a heap pointer,
        # and fbgemm_linear_* dereference such a blob, which a client could forge.
        r"^fbgemm_",
        # Packed weights of any backend (*_prepack, *_unpack, *_pack_*): opaque blobs with
        # native pointers inside. See _FAMILY_EXCEPTIONS for lu_unpack.
        r"(^|_)(pre|un)?pack(_|$)",
        # Quantized RNN cells: they take fbgemm-packed weights and their column offsets.
        r"^quantized_\w*_cell$",
        # Sparse constructors with caller-chosen indices: torch checks them only when asked
        # (check_invariants; it warns that unchecked ones give memory errors). The
        # private _sparse_* ones are denied with every private name.
        r"^sparse_\w*tensor",
        # Resize in any spelling (resize_, resize_as_, sparse_resize_, resize_as_sparse_, the
        # deprecated resize): growing a tensor exposes uninitialised memory, and resizing
        # a sparse tensor in place breaks the invariants its indices were checked against.
        r"resize",
        # Uninitialised memory: may hold the bytes of another client's freed tensor.
        r"(^|_)empty(_|$)",
        # Foreign memory protocols: a capsule that hands out the tensor's memory.
        r"dlpack",
        # Backend kernels that take raw weight buffers with caller-chosen strides
        # (miopen_rnn's weight_stride0), and opaque layouts whose memory torch does not
        # bounds-check (to_mkldnn); training needs neither.
        r"miopen|cudnn|mkldnn",
    )
)

# Names a family above would deny, which stay allowed.
_FAMILY_EXCEPTIONS = frozenset(
    {
        # Unpacks an LU factorisation (plain tensors, no packed weights); torch checks its
        # pivots are in range.
        "lu_unpack",
    }
)

# Single operations no family covers. Each group says why.
_DENIED = frozenset(
    {
        # storage, raw memory, other processes, foreign memory protocols
        "set_", "is_set_to", "share_memory_", "is_shared", "pin_memory", "is_pinned",
        "record_stream", "numpy", "__array__", "__array_wrap__", "__cuda_array_interface__",
        "module_load",
        # a view of src over the storage of its other argument, with src's geometry and
        # offset 0: it reaches outside the slice a client was given, as as_strided does
        "slice_inverse",
        # pickling and copying protocol
        "__reduce_ex__", "__reduce__", "__setstate__", "__getstate__", "__deepcopy__",
        # callables and hooks
        "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
        # a context manager over the worker's global autocast state, not a tensor operation
        "autocast",
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
    if name.startswith("_") and name not in _OPERATOR_DUNDERS:
        # Private torch internals (_nested_*, _sparse_*, _local_scalar_dense, ...) skip
        # the checks torch's public functions make.
        return False
    if name in _FAMILY_EXCEPTIONS:
        return True
    return not any(family.search(name) for family in _DENIED_FAMILIES)


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
#: training update (:mod:`fedtensor.worker.local_update`), a held-out evaluation
#: (:mod:`fedtensor.worker.evaluate`). Plans cannot call them.
WORKER_OPERATIONS: frozenset[str] = frozenset(
    {"fedtensor.dataset", "fedtensor.evaluate", "fedtensor.local_update"}
    # Simulated clients: one executor's sampled clients trained in one command
    # (fedtensor.worker.local_updates).
    | {"fedtensor.local_updates"}
    # Secure aggregation's stages (fedtensor.worker.secagg).
    | {
        "fedtensor.secagg_setup",
        "fedtensor.secagg_public_keys",
        "fedtensor.secagg_share_keys",
        "fedtensor.secagg_mask",
        "fedtensor.secagg_unmask",
    }
    # Tags and search, and moving tensors between workers (fedtensor.worker.exchange).
    | {
        "fedtensor.alias",
        "fedtensor.capability",
        "fedtensor.deliver",
        "fedtensor.describe",
        "fedtensor.search",
    }
    # PySyft-style training on pointers: the client's no_grad, one pointer per element of
    # a multi-output result, torch.autograd.grad, p.grad = None, a fetch that checks
    # unawaited backward() results on its way (fedtensor.worker.autograd_ops).
    | {
        "fedtensor.autograd_grad",
        "fedtensor.checked",
        "fedtensor.element",
        "fedtensor.no_grad",
        "fedtensor.set_attribute",
    }
    # A PySyft-style plan stored on the worker, run once (fedtensor.worker.plan_run).
    | {"fedtensor.run_plan"}
    # The crypto provider's Beaver triples for secret sharing, and a data owner's shares
    # of a tensor it holds (fedtensor.worker.sharing).
    | {"fedtensor.beaver_triple", "fedtensor.split_shares"}
)

#: Torch functions a pointer runs as one of fedtensor's own worker operations (the
#: generic autograd entry points stay off the allow-list).
WORKER_FUNCTIONS: dict[Any, str] = {torch.autograd.grad: "fedtensor.autograd_grad"}


def is_allowed(name: str) -> bool:
    """Whether a worker runs the operation called ``name``."""
    return name in OPERATIONS or name in WORKER_OPERATIONS


def allowed_operations() -> list[str]:
    """The sorted names of every operation a worker runs."""
    return sorted({*OPERATIONS, *WORKER_OPERATIONS})
