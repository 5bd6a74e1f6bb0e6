"""A client's memory budget on a worker: what it stores, what it would allocate, what
it has not read.

Theory of operation
-------------------
A worker serving a network gives each client (each
:class:`~fedtensor.worker.actor.Session`) a budget in bytes, by default a quarter of
the machine's physical memory (:func:`default_budget`; ``fedtensor worker
--memory-quota``), and a :class:`Ledger` that counts what the client holds against it:

- **Every stored value counts**, not only tensors: :func:`python_bytes` estimates
  what a Python value occupies (containers and their slots, numbers, strings,
  bytes, rounded up to the allocator's 16-byte granules, plus
  :data:`TENSOR_OVERHEAD` for each tensor object), and a tensor's elements are
  counted once per *storage*: two stored views of one tensor cost its memory
  once, and a small view that keeps a large tensor alive costs the large
  tensor. A tensor that requires grad is charged its size again, for the grad
  ``backward()`` may give it later. What a stored object was charged is
  recorded under its id, so freeing it returns exactly that.
- **An operation is checked before it runs** (:func:`check_call`): the worker
  runs it first on ``meta`` tensors (same shapes, dtypes and strides, no
  memory), sums the storages the result would allocate, and refuses it with a
  ``"limit"`` failure when that is past what the client has left. Operations
  whose inputs bound their output (the elementwise, reduction, view and product
  operations of :data:`fedtensor.worker.inline.NAMES`) skip the meta run when
  that bound already fits: torch's meta kernels for elementwise operations cost
  up to 100 microseconds, 50 times the operation on a small tensor, and the
  first one in a process imports torch's compiler stack (seconds, once). Operations
  whose output size depends on the data (``nonzero``, ``unique``,
  ``masked_select``, ``tolist``, ``item``) have no meta kernel: they run only if a
  bound from their inputs (:data:`UNKNOWN_BYTES_PER_ELEMENT` per input element:
  ``tolist`` of a float tensor makes a Python float and a list slot of each)
  fits the budget. Operations with no tensor input (factories) run on meta with
  ``device="meta"``; a device named in the arguments becomes ``"meta"`` too, so
  the check itself never allocates.
- **Plans** (``fedtensor.local_update``, :func:`check_worker_operation`) are run
  once on meta tensors of a batch's shape, node by node
  (:meth:`~fedtensor.worker.compiler.CompiledPlan.dry_run`): a node, or the
  step's total, past what is left refuses the update before it trains; so does a
  node whose output size meta tensors cannot tell, since nothing would then bound
  the nodes after it. The training commands' dry runs are remembered per client
  (:class:`~fedtensor.worker.dry_runs.DryRuns`, an LRU of a few): a round that
  repeats the last one's plan on the same shapes is charged the same size
  without running it again. ``fedtensor.run_plan`` and ``fedtensor.evaluate`` (one
  batch, and its copy of the state) are dry-run the same way; ``fedtensor.search``
  is sized by an entry per described object it may list (:func:`search_bytes`);
  fedtensor's other worker operations are bounded by their inputs, as
  data-dependent operations are (:func:`check_worker_operation` says why at each).
- **Tags and descriptions** (``fedtensor.describe``) are charged beside their
  object (:meth:`Ledger.charge_extra`) until the metadata is dropped.
- After it ran, the result is charged at its real cost (:meth:`Ledger.store`):
  the pre-check bounds the peak, the ledger what stays.
- **Autograd graphs count.** A result that requires grad keeps the tensors its
  ``grad_fn`` saved for backward alive after the client freed them (a chain of
  200 operations on a 1 MiB tensor held 75 MiB and was charged 4 MiB). The
  client's torch operations with an input that requires grad
  (:func:`requires_grad`) run under :meth:`Ledger.saved_tensors` (torch's
  ``saved_tensors_hooks``; about 2.5 microseconds an operation): each tensor
  saved for backward is charged as one more user of its storage (so a storage
  that is both stored and saved counts once), or refused with a ``"limit"``
  failure (:class:`SavedOverBudget`) when it does not fit; the charge is
  returned when the graph node lets go of it (the node is freed, or
  ``backward()`` ran). That release may happen on any thread (a client
  dropping a fetched result): it is queued, and the ledger settles the queue
  before it next charges or releases.
- **Replies not read** (:class:`Replies`): the bytes of replies computed and not
  yet written to the client are bounded per connection (``READ_AHEAD``, 64 MiB).
  A fetch that would pass the bound waits, with every command after it (the
  session is *parked*), until the client has read enough; the worker stops
  reading from that client meanwhile, and serves others.

A check or a charge that does not fit yields a :class:`~fedtensor.worker.failed.Failed`
of kind ``"limit"``, which the client sees as :class:`~fedtensor.LimitExceeded`
naming the quota; nothing past the budget is allocated.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import torch

from fedtensor.errors import FedTensorError
from fedtensor.worker.compiler import compile_plan, state_entries
from fedtensor.worker.dry_runs import DryRuns
from fedtensor.worker.evaluate import EVALUATE_BATCH_SIZE
from fedtensor.worker.failed import Failed
from fedtensor.worker.inline import NAMES as _BOUNDED_BY_INPUTS
from fedtensor.worker.local_update import memory_bytes
from fedtensor.worker.local_updates import memory_bytes as _batch_memory_bytes
from fedtensor.worker.shape_rules import shape_rules
from fedtensor.worker.sharing import split_bytes, triple_bytes

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "TENSOR_OVERHEAD",
    "UNKNOWN_BYTES_PER_ELEMENT",
    "Ledger",
    "Replies",
    "SavedOverBudget",
    "check_call",
    "check_worker_operation",
    "default_budget",
    "meta_bytes",
    "metadata_bytes",
    "python_bytes",
    "reply_bytes",
    "requires_grad",
]

#: The default budget per client, as a fraction of the machine's physical memory.
DEFAULT_BUDGET_FRACTION = 4
#: Bytes a tensor object costs besides its elements: the Python object, torch's
#: TensorImpl and StorageImpl (about 400 bytes measured, rounded up).
TENSOR_OVERHEAD = 512
#: Bytes per input element charged to an operation whose output size depends on
#: the data: ``tolist`` makes a 24-byte Python float and an 8-byte slot per
#: element, rounded to 16-byte granules, plus the lists of each row.
UNKNOWN_BYTES_PER_ELEMENT = 48
#: The largest element (complex128): what a bound from element counts multiplies by.
_MAX_ITEMSIZE = 16


def default_budget() -> int:
    """The default budget per client: a quarter of this machine's physical memory."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: a fixed 4 GiB
        total = 16 << 30
    return max(total // DEFAULT_BUDGET_FRACTION, 256 << 20)


def _granules(size: int) -> int:
    return (size + 15) & ~15


class _OverBudget(Exception):
    """Raised inside a walk once the running total passes its limit."""


class _Walk:
    """One value's cost, gathered in one pass: Python bytes and the tensors' storages."""

    __slots__ = ("grads", "limit", "python", "storages")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.python = 0
        self.grads = 0
        # storage key -> nbytes, each storage once
        self.storages: dict[int, int] = {}

    def add(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self._tensor(value)
        elif value is None or value is True or value is False:
            return  # singletons
        elif isinstance(value, list | tuple):
            self.python += _granules(sys.getsizeof(value))
            for item in value:
                self.add(item)
        elif isinstance(value, dict):
            self.python += _granules(sys.getsizeof(value))
            for key, item in value.items():
                self.add(key)
                self.add(item)
        else:
            self.python += _granules(sys.getsizeof(value))
        if self.python + self.grads > self.limit:
            raise _OverBudget

    def _tensor(self, tensor: torch.Tensor) -> None:
        self.python += TENSOR_OVERHEAD
        key, nbytes = _storage_of(tensor)
        self.storages[key] = nbytes
        grad = tensor.grad if tensor.is_leaf or tensor.retains_grad else None
        if grad is not None:
            self._tensor(grad)
        elif tensor.requires_grad:
            self.grads += tensor.numel() * tensor.element_size()  # a grad backward() may add


def _storage_of(tensor: torch.Tensor) -> tuple[int, int]:
    """A key naming ``tensor``'s memory among live storages, and that memory's bytes."""
    if tensor.layout is torch.strided and not tensor.is_nested:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes:
            return storage.data_ptr(), nbytes
        return 0, 0
    # Sparse and other layouts: no one storage to name; counted as if dense, on its own.
    return -id(tensor), tensor.numel() * tensor.element_size()


def metadata_bytes(tags: frozenset[str], description: str | None) -> int:
    """What an object's tags and description occupy (each string counted, even one
    shared with another object's tags: never below what they take)."""
    size = _granules(sys.getsizeof(tags)) + 64  # the set, and the pair holding it
    for tag in tags:
        size += _granules(sys.getsizeof(tag))
    if description is not None:
        size += _granules(sys.getsizeof(description))
    return size


def python_bytes(value: Any) -> int:
    """What ``value`` occupies, estimated conservatively (tensor storages counted once)."""
    walk = _Walk(sys.maxsize)
    walk.add(value)
    return walk.python + walk.grads + sum(walk.storages.values())


class SavedOverBudget(Exception):
    """Raised by the pack hook of :meth:`Ledger.saved_tensors` when a tensor saved
    for backward does not fit the budget; ``failed`` is what the client gets."""

    def __init__(self, failed: Failed) -> None:
        super().__init__(failed.message)
        self.failed = failed


class _Saved:
    """What autograd keeps for a saved tensor: the tensor, and its charge's key.

    Its end (the graph node freed, or backward run) queues the key on its
    ledger's ``released``; the ledger settles it on its own thread (a deque's
    ``append`` is atomic, so any thread may end it).
    """

    __slots__ = ("key", "released", "tensor")

    def __init__(self, tensor: torch.Tensor, key: int, released: deque[int]) -> None:
        self.tensor = tensor
        self.key = key
        self.released = released

    def __del__(self) -> None:
        self.released.append(self.key)


def _unpack_saved(saved: _Saved) -> torch.Tensor:
    return saved.tensor


def requires_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether any tensor among an operation's (resolved) arguments requires grad:
    autograd saves nothing for an operation without one, so it runs without the
    hooks of :meth:`Ledger.saved_tensors` (entering them costs about a microsecond)."""
    for value in args:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif isinstance(value, list | tuple | dict) and _nested_requires_grad(value):
            return True
    return bool(kwargs) and _nested_requires_grad(kwargs)


def _nested_requires_grad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, list | tuple):
        return any(_nested_requires_grad(item) for item in value)
    if isinstance(value, dict):
        return any(_nested_requires_grad(item) for item in value.values())
    return False


class Ledger:
    """What one client's stored objects cost, against its budget (see the module header)."""

    __slots__ = ("_charges", "_extras", "_released", "_storages", "budget", "dry_runs", "used")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        #: The client's last plan dry runs (fedtensor.worker.dry_runs): a round that
        #: repeats the last one's plan on the same shapes is sized without one.
        self.dry_runs = DryRuns()
        # storage keys of tensors saved for backward whose graph node let go of them
        self._released: deque[int] = deque()
        # object id -> bytes held beside the object (its tags and description)
        self._extras: dict[int, int] = {}
        # storage key -> [nbytes charged, stored objects using it]
        self._storages: dict[int, list[int]] = {}
        # object id -> (Python bytes and grads, storage keys)
        self._charges: dict[int, tuple[int, tuple[int, ...]]] = {}

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def store(self, id_: int, value: Any) -> Any:
        """Charge ``value`` stored under ``id_`` (what was there is released first).

        Returns what to store: ``value``, or a ``"limit"`` Failed marker when it
        does not fit, which costs nothing.
        """
        self.release(id_)  # settles released saved tensors too
        kind = type(value)
        if kind is Failed:
            return value
        if (
            kind is torch.Tensor
            and not value.requires_grad
            and value.layout is torch.strided
            and not value.is_nested
            and value.grad is None
        ):
            return self._store_tensor(id_, value)  # the common case, without a walk
        walk = _Walk(self.remaining)
        try:
            walk.add(value)
        except _OverBudget:
            return self._refused(walk.python + walk.grads, "storing")
        storages = self._storages
        fresh = sum(nbytes for key, nbytes in walk.storages.items() if key not in storages)
        size = walk.python + walk.grads + fresh
        if size > self.remaining:
            return self._refused(size, "storing")
        for key, nbytes in walk.storages.items():
            entry = storages.get(key)
            if entry is None:
                storages[key] = [nbytes, 1]
            else:
                entry[1] += 1
        self._charges[id_] = (walk.python + walk.grads, tuple(walk.storages))
        self.used += size
        return value

    def _store_tensor(self, id_: int, tensor: torch.Tensor) -> Any:
        """:meth:`store` of a plain tensor (no grad, strided): what a walk would charge."""
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = storage.data_ptr() if nbytes else 0
        entry = self._storages.get(key)
        size = TENSOR_OVERHEAD + (0 if entry is not None else nbytes)
        if size > self.remaining:
            return self._refused(size, "storing")
        if entry is None:
            self._storages[key] = [nbytes, 1]
        else:
            entry[1] += 1
        self._charges[id_] = (TENSOR_OVERHEAD, (key,))
        self.used += size
        return tensor

    def release(self, id_: int) -> None:
        """Return what the object under ``id_`` was charged (nothing if none is)."""
        if self._released:
            self.settle()
        charge = self._charges.pop(id_, None)
        if charge is None:
            return
        own, keys = charge
        self.used -= own
        storages = self._storages
        for key in keys:
            entry = storages[key]
            entry[1] -= 1
            if not entry[1]:
                del storages[key]
                self.used -= entry[0]

    def clear(self) -> None:
        self._charges.clear()
        self._storages.clear()
        self._extras.clear()
        self._released.clear()
        self.used = 0

    # -- tensors saved for backward ---------------------------------------------------------------

    def saved_tensors(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A context in which every tensor autograd saves for backward is charged to
        this ledger until its graph node lets go of it (see the module header);
        past the budget, the saving operation raises :class:`SavedOverBudget`."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack_saved)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        if self._released:
            self.settle()
        key, nbytes = _storage_of(tensor)
        entry = self._storages.get(key)
        if entry is None:
            if nbytes > self.budget - self.used:
                raise SavedOverBudget(self._refused(nbytes, "keeping a tensor for backward:"))
            self._storages[key] = [nbytes, 1]
            self.used += nbytes
        else:
            entry[1] += 1  # a storage stored or saved already: counted once
        return _Saved(tensor, key, self._released)

    def settle(self) -> None:
        """Return the charges of saved tensors whose graph nodes let go of them."""
        released = self._released
        storages = self._storages
        while released:
            key = released.popleft()
            entry = storages.get(key)
            if entry is None:
                continue  # cleared meanwhile
            entry[1] -= 1
            if not entry[1]:
                del storages[key]
                self.used -= entry[0]

    def charge_extra(self, id_: int, size: int, what: str) -> Failed | None:
        """Charge ``size`` bytes held beside object ``id_`` (its tags, its description)
        in place of what was charged for it before; a ``"limit"`` failure if it does
        not fit. Kept until :meth:`release_extra`, not with the object: what it pays
        for may outlive the object (metadata is dropped lazily)."""
        if self._released:
            self.settle()
        change = size - self._extras.get(id_, 0)
        if change > self.remaining:
            return self._refused(change, what)
        self._extras[id_] = size
        self.used += change
        return None

    def release_extra(self, id_: int) -> None:
        self.used -= self._extras.pop(id_, 0)

    def extra_ids(self) -> list[int]:
        """The ids something is charged beside (see :meth:`charge_extra`)."""
        return list(self._extras)

    def extra_count(self) -> int:
        return len(self._extras)

    def refusal(self, size: int, what: str) -> Failed:
        """The failure for ``what`` needing ``size`` bytes more than the client has left."""
        return self._refused(size, what)

    def _refused(self, size: int, what: str) -> Failed:
        return Failed(
            "limit",
            "MemoryQuotaExceeded",
            f"{what} {size} bytes: past the client's memory quota of "
            f"{self.budget} bytes ({self.used} in use)",
        )


# -- the check before an operation runs --------------------------------------------------------


class _Unknown(Exception):
    """An argument or operation whose output size meta tensors cannot tell."""


def _meta_copy(value: Any, inputs: dict[int, int]) -> Any:
    """``value`` with each tensor replaced by a meta tensor of its shape, dtype and strides.

    ``inputs`` collects each meta copy's storage (``_cdata``) and its bytes, so that
    an output using one of them is seen to allocate nothing (a view, an in-place op).
    """
    if isinstance(value, torch.Tensor):
        if value.layout is not torch.strided or value.is_nested or value.is_quantized:
            raise _Unknown
        meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        storage = meta.untyped_storage()
        inputs[storage._cdata] = storage.nbytes()
        return meta
    kind = type(value)
    if kind is list:
        return [_meta_copy(item, inputs) for item in value]
    if kind is tuple:
        return tuple(_meta_copy(item, inputs) for item in value)
    if kind is dict:
        return {
            key: "meta" if key == "device" else _meta_copy(item, inputs)
            for key, item in value.items()
        }
    if isinstance(value, torch.device) or (kind is str and _is_device_name(value)):
        return "meta"  # ``x.to("cpu")``, ``new_ones(..., "cpu")``: never a real allocation here
    return value


def _is_device_name(text: str) -> bool:
    return text == "cpu" or text.startswith(("cuda", "mps", "xpu", "hpu", "privateuseone"))


def _new_bytes(value: Any, inputs: dict[int, int], seen: set[int]) -> int:
    """Bytes of the storages in a meta result that are not its inputs' (each once)."""
    if isinstance(value, torch.Tensor):
        if not value.is_meta:
            return TENSOR_OVERHEAD + value.numel() * value.element_size()
        storage = value.untyped_storage()
        key = storage._cdata
        if key in inputs or key in seen:
            return TENSOR_OVERHEAD
        seen.add(key)
        return TENSOR_OVERHEAD + storage.nbytes()
    if isinstance(value, list | tuple):
        return sum(_new_bytes(item, inputs, seen) for item in value)
    if isinstance(value, dict):
        return sum(_new_bytes(item, inputs, seen) for item in value.values())
    return 0


def meta_bytes(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Bytes ``func(*args, **kwargs)`` would allocate for its result, from a meta run.

    Raises :class:`_Unknown` when meta tensors cannot tell (a data-dependent size,
    no meta kernel, an argument that has no meta twin).
    """
    inputs: dict[int, int] = {}
    try:
        meta_args = _meta_copy(args, inputs)
        meta_kwargs = _meta_copy(kwargs, inputs)
        if not inputs:
            meta_kwargs["device"] = "meta"  # a factory: ones, arange, rand...
        before = {key: nbytes for key, nbytes in inputs.items()}
        with torch.no_grad():
            result = func(*meta_args, **meta_kwargs)
    except Exception as exc:
        raise _Unknown from exc
    size = _new_bytes(result, inputs, set())
    # An input grown in place (an ``out=`` tensor resized) allocates too.
    grown = _grown(meta_args, before) + _grown(meta_kwargs, before)
    return size + grown


def _grown(value: Any, before: dict[int, int]) -> int:
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        was = before.get(storage._cdata)
        return max(storage.nbytes() - was, 0) if was is not None else 0
    if isinstance(value, list | tuple):
        return sum(_grown(item, before) for item in value)
    if isinstance(value, dict):
        return sum(_grown(item, before) for item in value.values())
    return 0


#: Operations of :data:`_BOUNDED_BY_INPUTS` whose output is not bounded by the
#: broadcast of their inputs' shapes (indexing with tensors, products): bounded by
#: the product of their inputs' sizes instead.
_PRODUCT_BOUNDED = frozenset(
    {"__getitem__", "__setitem__", "matmul", "mm", "mv", "dot", "__matmul__", "__rmatmul__"}
)


def _input_bound(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """A bound on the bytes an operation of :data:`_BOUNDED_BY_INPUTS` returns.

    Elementwise operations, reductions and views return at most the elements of
    their inputs' broadcast shape (two results for ``max(dim)``), of at most 16
    bytes; indexing and products at most the product of their inputs' sizes
    (and of the lengths of list arguments: an index list).
    """
    shapes: list[torch.Size] = []
    product = 1
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, torch.Tensor):
            shapes.append(arg.shape)
            product *= max(arg.numel(), 1)
        elif type(arg) is list or type(arg) is tuple:
            product *= max(len(arg), 1)
            for item in arg:
                if isinstance(item, torch.Tensor) or type(item) in (list, tuple, dict):
                    return sys.maxsize  # deeper than this bound looks
        elif type(arg) is dict:
            return sys.maxsize
    if name in _PRODUCT_BOUNDED or not shapes:
        return 2 * _MAX_ITEMSIZE * product
    return 2 * _MAX_ITEMSIZE * _broadcast_numel(shapes) + 2 * TENSOR_OVERHEAD


def _broadcast_numel(shapes: list[torch.Size]) -> int:
    """Elements of the shapes' broadcast (torch.broadcast_shapes is 10x slower)."""
    first = shapes[0]
    if all(shape == first for shape in shapes):
        return max(first.numel(), 1)
    dims = [1] * max(len(shape) for shape in shapes)
    for shape in shapes:
        offset = len(dims) - len(shape)
        for position, size in enumerate(shape):
            have = dims[offset + position]
            if size != have and size != 1:
                if have != 1:
                    return sys.maxsize  # not broadcastable: the operation will say so
                dims[offset + position] = size
    numel = 1
    for size in dims:
        numel *= max(size, 1)
    return numel


def _unknown_bound(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """What a data-dependent operation may allocate, at most: a few Python objects, or
    an index of each dimension, per input element."""
    total = 0
    for value in _tensors((args, kwargs)):
        per_element = UNKNOWN_BYTES_PER_ELEMENT + 8 * value.dim()
        total += TENSOR_OVERHEAD + value.numel() * per_element
    return total


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [tensor for item in value for tensor in _tensors(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    return []


#: Operations that allocate nothing a meta run could tell of: autograd's grads are
#: reserved when a tensor that requires grad is stored (see :class:`Ledger`).
_UNCHECKED = frozenset({"backward", "requires_grad_", "retain_grad", "detach", "detach_"})


def check_call(
    op: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], ledger: Ledger
) -> Failed | None:
    """A ``"limit"`` failure if running ``op`` could allocate past ``ledger``'s budget.

    ``args`` and ``kwargs`` are resolved (tensors, not refs). None: run it.
    """
    name = op.rpartition(".")[2]
    if name in _UNCHECKED:
        return None
    remaining = ledger.remaining
    if name in _BOUNDED_BY_INPUTS and _input_bound(name, args, kwargs) <= remaining:
        return None
    try:
        size = meta_bytes(func, args, kwargs)
        what = f"{op} would allocate"
    except _Unknown:
        size = _unknown_bound(args, kwargs)
        what = f"{op} (its output size depends on the data) may allocate"
    if size > remaining:
        return ledger.refusal(size, what)
    return None


def _dry_run_refused(op: str, exc: MemoryError, ledger: Ledger) -> Failed:
    """The failure of ``op`` whose dry run found it would pass what the client has left."""
    return Failed(
        "limit",
        "MemoryQuotaExceeded",
        f"{op}: {exc}: past what the client's memory quota of {ledger.budget} "
        f"bytes leaves ({ledger.used} in use)",
    )


def check_worker_operation(
    op: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ledger: Ledger,
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    metadata: Mapping[int, Any] | None = None,
    objects: Container[int] = (),
) -> Failed | None:
    """:func:`check_call` for fedtensor's own operations, which never run on meta.

    A data set's part costs its bytes; ``fedtensor.local_update`` what
    :func:`fedtensor.worker.local_update.memory_bytes` reckons from a dry run of
    its plan; ``fedtensor.run_plan`` and ``fedtensor.evaluate`` a dry run of theirs
    (a batch's, for evaluation); ``fedtensor.search`` an entry per object described in
    ``metadata`` (the session's) and stored in ``objects``, and per data set part;
    the others are bounded by their inputs as a data-dependent operation is (the
    comment at each says why).
    """
    remaining = ledger.remaining
    if op == "fedtensor.dataset":
        name = args[0] if args else kwargs.get("name")
        part = args[1] if len(args) > 1 else kwargs.get("part")
        found = datasets.get(name) if isinstance(name, str) else None
        if found is None or part not in ("data", "targets"):
            return None  # the operation says what is wrong
        size = TENSOR_OVERHEAD + found[0 if part == "data" else 1].nbytes
        what = f"{op} would allocate"
    elif op in ("fedtensor.local_update", "fedtensor.local_updates"):
        try:
            reckon = memory_bytes if op == "fedtensor.local_update" else _batch_memory_bytes
            size = reckon(*args, limit=remaining, dry_runs=ledger.dry_runs, **kwargs)
        except (TypeError, FedTensorError):
            return None  # wrong arguments, a plan refused: the operation says so
        except MemoryError as exc:
            return _dry_run_refused(op, exc, ledger)
        what = f"{op} may allocate"
    elif op == "fedtensor.beaver_triple":  # sized by its arguments, not its inputs
        try:
            size = triple_bytes(*args, **kwargs)
        except (TypeError, ValueError):
            return None  # the operation says what is wrong
        what = f"{op} would allocate"
    elif op == "fedtensor.split_shares":  # the owner's shares of a tensor it holds
        try:
            size = split_bytes(*args, **kwargs)
        except (TypeError, ValueError):
            return None  # the operation says what is wrong
        what = f"{op} would allocate"
    elif op in ("fedtensor.run_plan", "fedtensor.evaluate"):
        # A plan's nodes allocate whatever they compute (a repeat of a 4-element input
        # to 1 GB): sized node by node by a run on meta tensors, as local_update is.
        try:
            size = _plan_run_bytes(op, args, kwargs, remaining)
        except (TypeError, ValueError, FedTensorError):
            return None  # wrong arguments, a plan refused: the operation says so
        except MemoryError as exc:
            return _dry_run_refused(op, exc, ledger)
        what = f"{op} may allocate"
    elif op == "fedtensor.search":
        # An entry per described object and data set part, each a dict and a list of its
        # tags: many cheap objects with many tags make a long answer to a short query.
        # Sized from the session's metadata before the search walks it.
        size = search_bytes(metadata or {}, objects, datasets)
        what = f"{op} may allocate"
    elif op == "fedtensor.alias":
        # Not past its budget: its result is its input itself, nothing allocated; storing
        # it charges the alias's own object (a tensor's storage once, whatever names it).
        size = 0
        what = f"{op} would allocate"
    elif op == "fedtensor.deliver":
        # Not past its budget: it encodes the value it sends (tensors out of band, Python
        # values smaller than in memory), which the transport may copy once: twice its size.
        size = 2 * reply_bytes(args[0]) if args else 0
        what = f"{op} may allocate"
    else:
        # Bounded by their inputs: secagg_setup and secagg_public_keys make a fixed few
        # hundred bytes; secagg_share_keys a sealed share per neighbour, each named by two
        # distinct 32-byte keys of its input; secagg_mask a few vectors of an entry per
        # entry of the global state's parameters it names (distinct keys: it refuses a
        # key named twice), at most 48 bytes each against the bound's 56; secagg_unmask a
        # share per neighbour that secagg_mask accepted; autograd_grad a grad shaped as
        # each of its inputs, its intermediates bounded by the graph's saved tensors,
        # charged when made.
        size = _unknown_bound(args, kwargs)
        what = f"{op} may allocate"
    if size > remaining:
        return ledger.refusal(size, what)
    return None


def _meta_twin(value: Any) -> Any:
    """A meta tensor of ``value``'s shape, dtype and strides; other values as they are."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def _plan_run_bytes(op: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> int:
    """What ``fedtensor.run_plan`` or ``fedtensor.evaluate`` may allocate, from a dry run.

    ``run_plan(plan, state, *inputs)`` keeps every node's output until it returns: the
    dry run's total. ``evaluate(plan, state, data, targets, batch_size=)`` copies the
    state, then runs batch by batch, each batch's nodes freed before the next: the
    state's bytes and one batch's dry run. Raises :class:`MemoryError` past ``limit``
    (or at a node whose size meta tensors cannot tell), :class:`TypeError`,
    :class:`ValueError` or a :class:`FedTensorError` for arguments the operation refuses.
    """
    copies = 0
    if op == "fedtensor.run_plan":
        if kwargs:
            raise TypeError("run_plan takes positional arguments")
        plan, state, *inputs = args
    else:
        plan, state, data, targets, batch_size = _evaluate_arguments(*args, **kwargs)
        if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("evaluate runs on tensors")
        if type(batch_size) is not int or batch_size < 1 or not data.dim() or not targets.dim():
            raise ValueError("a batch size of at least 1, tensors of a dimension or more")
        rows = min(batch_size, len(data))
        inputs = [
            torch.empty((rows, *data.shape[1:]), dtype=data.dtype, device="meta"),
            torch.empty((rows, *targets.shape[1:]), dtype=targets.dtype, device="meta"),
        ]
    compiled = compile_plan(plan)
    entries = state_entries(compiled, state)
    if op == "fedtensor.evaluate":  # its copy of the state
        copies = sum(TENSOR_OVERHEAD + int(value.nbytes) for value in entries.values())
        if copies > limit:
            raise MemoryError(f"the model state's copy would take {copies} bytes")
    meta_state = {key: _meta_twin(value) for key, value in entries.items()}
    meta_inputs = [_meta_twin(value) for value in inputs]
    with shape_rules():  # no Python meta kernels for the common operations
        return copies + compiled.dry_run(meta_state, *meta_inputs, limit=limit - copies)


def _evaluate_arguments(
    plan: Any, state: Any, data: Any, targets: Any, *, batch_size: Any = EVALUATE_BATCH_SIZE
) -> tuple[Any, Any, Any, Any, Any]:
    """``fedtensor.evaluate``'s arguments, bound as it binds them."""
    return plan, state, data, targets, batch_size


#: Bytes of one entry of ``fedtensor.search``'s answer besides its tag list and shape:
#: a dict of six keys (about 360 bytes with its slots), its id or name, and the answer
#: list's slot, rounded up.
_SEARCH_ENTRY_BYTES = 512
#: Dimensions assumed for a described object's shape (a tensor has at most 64 in torch).
_SEARCH_SHAPE_SLOTS = 64


def search_bytes(
    metadata: Mapping[int, Any],
    objects: Container[int],
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> int:
    """What ``fedtensor.search`` may allocate: as if every described object still in
    ``objects`` and every data set part matched (a list of 8-byte slots of its tags,
    and of its shape)."""
    lists = 2 * 64  # the headers of an entry's tag list and shape list
    size = 64  # the answer's list
    for id_, entry in metadata.items():
        if id_ not in objects:
            continue  # released since it was described: the search drops it
        tags = entry[0] if type(entry) is tuple and entry else ()
        size += _SEARCH_ENTRY_BYTES + lists + 8 * (len(tags) + _SEARCH_SHAPE_SLOTS)
    for data, targets in datasets.values():
        size += 2 * (_SEARCH_ENTRY_BYTES + lists + 8 * 16) + 8 * (data.dim() + targets.dim())
    return size


# -- replies a client has not taken -------------------------------------------------------------


class Replies:
    """Bytes of one connection's replies that the client has not taken yet.

    ``admitted`` counts the bytes of the fetches run and not yet handed on (the
    actor's thread runs a batch in slices, and hands their replies on together);
    ``handed`` the bytes of encoded replies handed to the event loop (both written by
    the thread that runs commands: the actor's, or the loop's for commands run
    inline, never both at once); ``arrived`` those the loop has passed to the
    connection, sent or dropped; ``unsent`` reads what the connection still has to
    write. :meth:`held` sums what the worker holds for the client in replies. A
    fetch that would take it past ``bound`` (unless nothing is held:
    any one value may be fetched) is not run: the session parks it and the
    commands after it, records in ``needed`` the bytes that fetch needs, and calls
    ``parked`` (from the actor's thread); the commands run again once the client has
    taken enough for it (:meth:`room_for_next`).
    """

    __slots__ = ("_sizes", "admitted", "arrived", "bound", "handed", "needed", "parked", "unsent")

    def __init__(
        self, bound: int, unsent: Callable[[], int], parked: Callable[[], object] = lambda: None
    ) -> None:
        self.bound = bound
        self.admitted = 0
        self._sizes: dict[int, int] = {}  # request -> bytes admitted for it
        self.handed = 0
        self.arrived = 0
        self.needed = 0
        self.unsent = unsent
        self.parked = parked

    def held(self) -> int:
        return self.admitted + self.handed - self.arrived + self.unsent()

    def admit(self, request: int, size: int) -> None:
        """A fetch of ``size`` bytes runs: its reply is held from now on."""
        self.admitted += size
        self._sizes[request] = self._sizes.get(request, 0) + size

    def hand_on(self, replies: Sequence[Any], size: int) -> None:
        """``replies``, ``size`` bytes encoded, go to the event loop."""
        self.handed += size
        sizes = self._sizes
        for reply in replies:
            request = getattr(reply, "request", None)
            if request is not None:
                self.admitted -= sizes.pop(request, 0)

    def room_for_next(self) -> bool:
        """Whether the fetch that was parked would now be run (the rule that parked it)."""
        held = self.held()
        return held <= 0 or held + self.needed <= self.bound


def reply_bytes(value: Any) -> int:
    """What replying with ``value`` holds until it is sent: its tensors, or its estimate."""
    if isinstance(value, torch.Tensor):
        grad = value.grad if value.is_leaf or value.retains_grad else None
        return value.nbytes + (grad.nbytes if grad is not None else 0) + TENSOR_OVERHEAD
    if value is None or type(value) in (int, float, bool, Failed):
        return 64
    return python_bytes(value)
