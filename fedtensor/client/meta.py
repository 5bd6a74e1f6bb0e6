"""Shapes and dtypes of remote results, known on the client without asking the worker.

Theory of operation
-------------------
A pointer made by an operation knows its result's shape and dtype at once when every
tensor among the operation's inputs has a known shape and dtype (a sent tensor, a
fetched one, or an earlier result known this way): the operation is run here on *meta*
tensors (torch's device without memory, which computes shapes, dtypes and nothing
else), in torch's own code, so whatever torch infers, fedtensor infers, broadcasting and
type promotion included. An operation whose result depends on values (``nonzero``,
``masked_select``, ``item``) raises on meta tensors, and its result's shape stays
unknown (``None``), as before.

What the result is also decides how many pointers an operation returns: a tuple or list
of tensors (``split``, ``max(dim=...)``, ``sort``) becomes one pointer per element (see
``remote_call`` in :mod:`fedtensor.client.pointer`).

Running an elementwise operation on meta tensors costs 15 to 400 microseconds (torch's
meta kernels for them are Python), more than fedtensor's whole per-operation cost, so
outcomes are cached by the operation and its arguments' *signature* (each tensor's shape
and dtype, each other argument's type and value): a training loop, which repeats the same
operations on the same shapes, pays a dictionary lookup per operation.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fedtensor.protocol.ops import OPERATIONS

__all__ = ["MAX_CACHED", "Described", "infer"]

#: Outcomes kept at most; the cache is emptied when it is full (training loops refill it
#: with the few signatures they use).
MAX_CACHED = 4096

#: What is known of a result: ``(shape, dtype)`` for a tensor, ``(kind, [(shape, dtype),
#: ...])`` for a tuple or list of tensors (``kind`` builds it from a list: ``tuple``,
#: ``list`` or one of ``torch.return_types``), or ``None``: unknown.
Described = tuple[Any, Any] | None

_cache: dict[Any, Described] = {}


class _Unknown(Exception):
    """An argument whose shape is not known locally, or that cannot be described."""


_PLAIN = frozenset({int, bool, str, type(None), type(...), torch.dtype, torch.memory_format})
# Numbers whose value never decides a result's shape or dtype (only their type does): a
# learning rate, an optimizer's bias correction, a clamp bound. Keyed by type alone, so
# that a step size that changes every step does not miss the cache every step. Only
# resampling takes a float that sets a shape (its scale factor): see _FLOAT_SIZED.
_VALUE_FREE = frozenset({float, complex})
_FLOAT_SIZED = ("interpolate", "upsample")


def _signature(value: Any, pointer_type: type[Any]) -> Any:
    """A hashable stand-in for ``value`` that decides the result's shape and dtype."""
    kind = type(value)
    if kind in _PLAIN:
        return (kind, value)  # 1 and True are equal keys but promote differently
    if kind in _VALUE_FREE:
        return kind
    if isinstance(value, pointer_type):
        shape = value._shape
        if shape is None or value._dtype is None:
            raise _Unknown
        return ("p", shape, value._dtype)
    if isinstance(value, torch.Tensor):
        return ("t", tuple(value.shape), value.dtype)
    if kind is list or kind is tuple or kind is torch.Size:
        return (kind, *(_signature(item, pointer_type) for item in value))
    if kind is dict:
        return (dict, *((key, _signature(item, pointer_type)) for key, item in value.items()))
    if kind is slice:
        return (slice, value.start, value.stop, value.step)  # slices hash from Python 3.12
    if kind is torch.device:
        return (torch.device, str(value))
    raise _Unknown


def _meta(value: Any, pointer_type: type[Any]) -> Any:
    """``value`` with every tensor and pointer replaced by a meta tensor like it."""
    if isinstance(value, pointer_type):
        return torch.empty(value._shape, dtype=value._dtype, device="meta")
    if isinstance(value, torch.Tensor):
        return torch.empty(tuple(value.shape), dtype=value.dtype, device="meta")
    kind = type(value)
    if kind is list:
        return [_meta(item, pointer_type) for item in value]
    if kind is tuple:
        return tuple(_meta(item, pointer_type) for item in value)
    if kind is dict:
        return {key: _meta(item, pointer_type) for key, item in value.items()}
    if kind is torch.device or (kind is str and value in ("cpu", "cuda")):
        return "meta"  # a device move stays on the meta device
    return value


def _describe(result: Any) -> Described:
    if isinstance(result, torch.Tensor):
        return (tuple(result.shape), result.dtype)
    if (
        isinstance(result, (tuple, list))
        and result
        and all(isinstance(item, torch.Tensor) for item in result)
    ):
        items = [(tuple(item.shape), item.dtype) for item in result]
        kind: Any = type(result)
        if kind is not list and kind is not tuple:
            kind = getattr(torch.return_types, kind.__name__, tuple)
        return (kind, items)
    return None


def _run(
    op: str, args: tuple[Any, ...], kwargs: dict[str, Any], pointer_type: type[Any]
) -> Described:
    if op == "Tensor.grad":  # a gradient has its tensor's shape and dtype
        return _describe(_meta(args[0], pointer_type)) if args else None
    if op == "fedtensor.autograd_grad":  # one gradient per input, shaped like it
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        if not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        return _describe(tuple(_meta(item, pointer_type) for item in inputs))
    func = OPERATIONS.get(op)
    if func is None:
        return None
    meta_args = tuple(_meta(arg, pointer_type) for arg in args)
    meta_kwargs = {key: _meta(value, pointer_type) for key, value in kwargs.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the worker warns, if anyone
            result = func(*meta_args, **meta_kwargs)
    except Exception:
        return None  # value-dependent (nonzero, item), or not for meta tensors
    return _describe(result)


def infer(
    op: str, args: tuple[Any, ...], kwargs: dict[str, Any], pointer_type: type[Any]
) -> Described:
    """What the result of ``op(*args, **kwargs)`` is, where torch can tell without values."""
    try:
        # The common case first, and without generators: one pointer and a scalar.
        key: list[Any] = [op]
        by_value = op.startswith("torch.nn.functional.") and any(
            word in op for word in _FLOAT_SIZED
        )
        for arg in args:
            kind = type(arg)
            if kind in _PLAIN or (by_value and kind in _VALUE_FREE):
                key.append((kind, arg))
            elif kind in _VALUE_FREE:
                key.append(kind)
            elif isinstance(arg, pointer_type):
                shape = arg._shape
                if shape is None or arg._dtype is None:
                    return None
                key.append((shape, arg._dtype))
            else:
                key.append(_signature(arg, pointer_type))
        if kwargs:
            key.extend(
                (
                    name,
                    (float, value)
                    if by_value and type(value) is float
                    else _signature(value, pointer_type),
                )
                for name, value in kwargs.items()
            )
        frozen = tuple(key)
        found = _cache.get(frozen, _cache)  # hashes the key: TypeError if it cannot be
    except (_Unknown, TypeError):
        return None
    if found is not _cache:
        return found  # type: ignore[return-value]
    described = _run(op, args, kwargs, pointer_type)
    if len(_cache) >= MAX_CACHED:
        _cache.clear()
    _cache[frozen] = described
    return described
