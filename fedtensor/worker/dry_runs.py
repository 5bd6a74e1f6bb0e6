"""Plan dry runs remembered: the same plan on the same shapes is sized once.

Theory of operation
-------------------
Before ``fedtensor.local_update`` or ``fedtensor.local_updates`` trains, the worker
sizes the command by running its plan once on ``meta`` tensors
(:meth:`~fedtensor.worker.compiler.CompiledPlan.dry_run`): about 5 ms, five times
the training of a small simulated client, paid by every executor in every round
although a round repeats the last one's plan on the same shapes.

A dry run reads nothing but shapes: the plan's structure (its nodes, their
operations and arguments, the shapes, dtypes and strides of the tensors it holds),
the model state's shapes, dtypes and strides by key, and the shapes and dtypes of
one batch of examples and of labels (the batch's rows: ``min(batch_size,
examples)``). The same key gives the same result, so :class:`DryRuns` keeps the
last few results (an LRU of :data:`ENTRIES`) under a digest of that key:

- **A digest, not the key**: a plan may have up to 100,000 nodes, and the cache
  belongs to one client's ledger (:class:`fedtensor.worker.budget.Ledger`), whose
  budget would not count a copy of them. The key is written out canonically
  (``repr`` of nested tuples of ints, strings, floats' ``repr``, each with its
  type: ``True`` and ``1`` differ) and hashed with BLAKE2b-256, so a client
  cannot make two different keys collide, as it could with Python's ``hash``.
- **Only successful runs**, as their total: the size charged is recomputed
  from it on every call (the state's copies depend on the optimizer, the epochs,
  the examples, each read again), and a total that no longer fits what the
  client has left runs the dry run again, which then refuses the command with
  the node that passes, as without the cache. A node's size is at most the
  total, so a remembered total that fits means every node fits.
- **Per client**: one client cannot learn from timing whether another ran a
  plan of this shape.

The key is built only after the plan compiled and the arguments were checked;
anything it cannot describe (a value of another type inside the plan) gives no
key, and the dry run runs as before.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedtensor.protocol.messages import Ref

__all__ = ["ENTRIES", "DryRuns", "dry_run_key"]

#: How many dry-run results a client's cache keeps (least recently used dropped).
ENTRIES = 8


class _Undescribed(Exception):
    """A value the key cannot describe exactly: no key, no cache."""


def _describe(value: Any) -> Any:
    """``value`` as nested tuples of primitives, each tagged with its type."""
    kind = type(value)
    if kind is Ref:
        return ("ref", int(value))
    if kind is int or kind is str or kind is bool or value is None:
        return (kind.__name__, value)
    if kind is float:
        return ("float", repr(value))  # -0.0 and 0.0, nan: as written
    if kind is list or kind is tuple:
        return (kind.__name__, tuple(_describe(item) for item in value))
    if kind is dict:
        items = sorted((repr(_describe(key)), _describe(item)) for key, item in value.items())
        return ("dict", tuple(items))
    if isinstance(value, torch.Tensor):
        return ("tensor", _tensor_shape(value))
    raise _Undescribed(kind.__name__)


def _tensor_shape(value: torch.Tensor) -> tuple[Any, ...]:
    """What a meta twin of ``value`` keeps: shape, dtype, strides, layout, grad."""
    if value.layout is not torch.strided or value.is_nested or value.is_quantized:
        raise _Undescribed("a tensor without strides")
    return (
        tuple(value.shape),
        str(value.dtype),
        tuple(value.stride()),
        value.requires_grad,
    )


def dry_run_key(plan: Any, state: Mapping[str, torch.Tensor], *inputs: Any) -> bytes | None:
    """A digest of what a dry run of ``plan`` on ``state`` and ``inputs`` reads, or None.

    ``inputs`` are what the dry run receives (meta tensors of a batch, or other
    values), described as plan values are.
    """
    try:
        text = repr(
            (
                _describe(plan),
                tuple(sorted((key, _tensor_shape(value)) for key, value in state.items())),
                _describe(list(inputs)),
            )
        )
    except _Undescribed:
        return None
    return hashlib.blake2b(text.encode(), digest_size=32).digest()


class DryRuns:
    """The last :data:`ENTRIES` dry-run totals of one client, by :func:`dry_run_key`."""

    __slots__ = ("_entries", "_lock", "hits", "runs")

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()  # a session's commands may run on any compute thread
        #: Lookups answered from the cache, and dry runs recorded (for tests and benchmarks).
        self.hits = 0
        self.runs = 0

    def get(self, key: bytes | None, limit: int) -> int | None:
        """The remembered total under ``key`` if it is at most ``limit``, else None."""
        if key is None:
            return None
        with self._lock:
            total = self._entries.get(key)
            if total is None or total > limit:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return total

    def put(self, key: bytes | None, total: int) -> None:
        """Remember a dry run's ``total`` under ``key`` (nothing when ``key`` is None)."""
        with self._lock:
            self.runs += 1
            if key is None:
                return
            self._entries[key] = total
            self._entries.move_to_end(key)
            while len(self._entries) > ENTRIES:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
