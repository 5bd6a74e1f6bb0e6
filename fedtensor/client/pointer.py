"""Pointers: local handles to tensors that live on workers.

A pointer is a future. Operating on it (``x + y``, ``torch.add(x, y)``,
``x.sum()``, ``F.relu(x)``) sends a command and returns a new pointer at once;
awaiting it brings back a copy of the value; ``get()`` brings it back and frees
it on the worker. When the last reference to a pointer goes, the remote object
is released.

:class:`PointerTensor` and :class:`MultiPointerTensor` are the async API;
:class:`SyncPointerTensor` and :class:`SyncMultiPointerTensor` are their
blocking twins for :mod:`fedtensor.sync`. All share one dispatch path,
:func:`remote_call`, which turns the arguments into wire values, checks that
all pointers live on one worker (or spreads a multi-pointer operation over its
workers), and queues one ``Call``. Its result knows its shape and dtype where torch
can infer them without values (:mod:`fedtensor.client.meta`); a result that is a tuple of
tensors (``split``, ``max(dim=...)``) becomes a tuple of pointers, one per element, each
taken out on the worker by a ``fedtensor.element`` command queued behind it. Called inside
the client's ``torch.no_grad()``, an operation travels as ``fedtensor.no_grad``, so that
the worker runs it without autograd too.

A command whose result nothing awaits would fail unseen: ``backward()`` is the one
PySyft code calls that way. So it is refused at once where the pointer knows its shape
and it cannot work, and otherwise its result is kept on the worker handle and checked
by the next await of a pointer to that worker: that fetch reads a ``fedtensor.checked``
command queued behind the results, in the same round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedtensor.client import transfer as _transfer
from fedtensor.client.engine import mark_retrieved
from fedtensor.client.meta import infer
from fedtensor.errors import (
    FedTensorError,
    ForbiddenOperation,
    LocationError,
    PointerReleased,
    RemoteError,
)
from fedtensor.protocol.messages import Call, Ref
from fedtensor.protocol.ops import ATTRIBUTES, FUNCTION_NAMES, OPERATIONS, WORKER_FUNCTIONS
from fedtensor.protocol.values import snapshot

if TYPE_CHECKING:
    from fedtensor.client.engine import Client
    from fedtensor.client.handles import WorkerHandle

__all__ = [
    "MAX_UNCHECKED",
    "LocalWorker",
    "MultiPointerTensor",
    "PointerBase",
    "PointerTensor",
    "SyncMultiPointerTensor",
    "SyncPointerTensor",
    "local_worker",
    "remote_call",
]

_local_ids = itertools.count(1)


class PointerBase:
    """What every pointer to one remote object has; see :class:`PointerTensor`."""

    __slots__ = (
        "__weakref__",
        "_client",
        "_dtype",
        "_error",
        "_meta",
        "_origin",
        "_shape",
        "id",
        "id_at_location",
        "location",
    )
    # Set only on some pointers (read with getattr): tags and description. ``_origin``: on
    # a pointer to a pointer (PySyft's ``x.send(bob).send(alice)``), the pointer it points
    # to; ``None`` on a plain pointer (fedtensor.client.transfer).
    _meta: tuple[frozenset[str], str | None]
    _origin: PointerBase | None

    def __init__(
        self,
        client: Client | None,
        id_at_location: int,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        *,
        location: WorkerHandle | None = None,
        error: FedTensorError | None = None,
    ) -> None:
        self._client = client
        self.id_at_location = id_at_location
        self.id = next(_local_ids)
        self.location: WorkerHandle = client.worker if client is not None else location  # type: ignore[assignment]
        self._shape = shape
        self._dtype = dtype
        self._error = error
        self._origin = None

    @classmethod
    def failed(cls, location: WorkerHandle, error: FedTensorError) -> PointerBase:
        """A pointer whose value is ``error``: awaiting it raises a copy of it."""
        return cls(None, 0, location=location, error=error)

    # -- what is known locally -------------------------------------------------------------------

    @property
    def owner(self) -> Any:
        return local_worker()

    @property
    def shape(self) -> torch.Size | None:
        """The shape, where known without asking the worker (else ``None``)."""
        return None if self._shape is None else torch.Size(self._shape)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype, where known without asking the worker (else ``None``)."""
        return self._dtype

    # Metadata methods, answered locally where the shape (or dtype) is known, as torch's
    # own module code asks them (``if input.dim() != 2``); else remote calls, as before.

    def dim(self) -> Any:
        """The number of dimensions (a pointer to it where the shape is unknown)."""
        shape = self._shape
        return len(shape) if shape is not None else remote_call("Tensor.dim", (self,), {})

    ndimension = dim

    @property
    def ndim(self) -> Any:
        return self.dim()

    def size(self, dim: int | None = None) -> Any:
        """``torch.Size`` of the shape, or one dimension's length (remote where unknown)."""
        shape = self._shape
        if shape is None:
            return remote_call("Tensor.size", (self,) if dim is None else (self, dim), {})
        return torch.Size(shape) if dim is None else shape[dim]

    def numel(self) -> Any:
        """The number of elements (a pointer to it where the shape is unknown)."""
        shape = self._shape
        return math.prod(shape) if shape is not None else remote_call("Tensor.numel", (self,), {})

    nelement = numel

    def is_floating_point(self) -> Any:
        dtype = self._dtype
        if dtype is None:
            return remote_call("Tensor.is_floating_point", (self,), {})
        return dtype.is_floating_point

    def is_complex(self) -> Any:
        dtype = self._dtype
        if dtype is None:
            return remote_call("Tensor.is_complex", (self,), {})
        return dtype.is_complex

    # -- tags and description (PySyft's; see fedtensor.client.transfer) ----------------------

    @property
    def tags(self) -> set[str]:
        """The tags this tensor carries (given when sent, by ``tag()``, or found by a search)."""
        return set(_transfer.metadata(self)[0])

    @property
    def description(self) -> str | None:
        return _transfer.metadata(self)[1]

    def tag(self, *tags: str) -> Any:
        """Add tags, on the worker (so ``worker.search`` finds it) and here; returns ``self``."""
        _transfer.describe(self, tags, None)
        return self

    def describe(self, description: str) -> Any:
        """Set the description (``worker.search`` matches words in it); returns ``self``."""
        _transfer.describe(self, (), description)
        return self

    def __repr__(self) -> str:
        where = getattr(self.location, "id", "?")
        state = ""
        if self._error is not None:
            state = " failed"
        elif self._client is None:
            state = " released"
        chain = ""
        inner = self._origin
        while inner is not None:  # a pointer to a pointer: where each link points
            chain += f" -> {getattr(inner.location, 'id', '?')}:{inner.id_at_location}"
            inner = inner._origin
        return (
            f"<{type(self).__name__} me:{self.id} -> {where}:{self.id_at_location}{chain}{state}>"
        )

    # -- remote values ---------------------------------------------------------------------------

    async def _fetch(self, *, free: bool, timeout: float | None) -> Any:
        if self._error is not None:
            raise type(self._error)(*self._error.args)
        client = self._client
        if client is None:
            raise PointerReleased(f"{self!r} was already consumed by get()")
        if self._origin is not None:
            # PySyft's x.send(bob).send(alice).get(): the pointer to bob (see transfer.py)
            return _transfer.hand_back(self, free=free)
        if free:
            # From here on the remote object belongs to this fetch, not to the pointer.
            self._client = None
        if self.location._unchecked:
            value = await _fetch_checked(self, client, free=free, timeout=timeout)
        else:
            value = await client.fetch(self.id_at_location, free=free, timeout=timeout)
        if isinstance(value, torch.Tensor):
            self._shape = tuple(value.shape)
            self._dtype = value.dtype
        return value

    async def fetch(self, *, free: bool = False, timeout: float | None = None) -> Any:
        """The remote value, awaited on the client's loop, for a pointer of either API.

        What ``get()`` (``free=True``) and ``value()`` do, as a coroutine even for a
        blocking pointer: for code that runs on the client's loop and holds pointers
        of either kind (:func:`fedtensor.fit`).
        """
        return await self._fetch(free=free, timeout=timeout)

    def fetch_soon(
        self, *, free: bool = False, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """What :meth:`fetch` gives, as a future whose fetch is queued now, on the client's
        loop: it travels in the frame of the commands queued before it
        (:meth:`fedtensor.client.engine.Client.fetch_soon`), so a command queued and its
        result fetched cost one frame each way. A pointer whose fetch needs more than one
        plain fetch (one to a pointer, one behind unchecked results) fetches as ``fetch``
        does, in a task. The future's failure counts as retrieved: a caller may give up
        on it.
        """
        client = self._client
        if (
            self._error is not None
            or client is None
            or self._origin is not None
            or self.location._unchecked
        ):
            task = asyncio.ensure_future(self._fetch(free=free, timeout=timeout))
            task.add_done_callback(mark_retrieved)
            return task
        future = client.fetch_soon(self.id_at_location, free=free, timeout=timeout)
        if free:
            self._client = None  # the remote object belongs to the fetch from here on
        return future

    def __del__(self) -> None:
        client = self._client
        if client is not None:
            self._client = None
            client.release(self.id_at_location)

    # -- no implicit round trips -----------------------------------------------------------------

    def __bool__(self) -> bool:
        raise TypeError(
            "the truth value of a remote tensor needs a round trip: await it (or get()) first"
        )

    __hash__ = object.__hash__

    def __len__(self) -> int:
        """The length of the first dimension, where the shape is known locally."""
        shape = self._shape
        if shape is None:
            raise TypeError(
                "the length of a remote tensor whose shape is not known locally needs a "
                "round trip: await it (or get()) first"
            )
        if not shape:
            raise TypeError("len() of a 0-d tensor")
        return shape[0]

    def __iter__(self) -> Any:
        """Pointers to ``self[0]``, ``self[1]``, ...: iteration and unpacking, no round trip."""
        if self._shape is None:
            raise TypeError(
                "a remote tensor whose shape is not known locally is not iterable: "
                "await it (or get()) first"
            )
        return (remote_call("Tensor.__getitem__", (self, index), {}) for index in range(len(self)))

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a pointer cannot be pickled: get() its value first")

    # -- operations ------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _torch_function(func, args, kwargs)

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        """``Tensor.backward`` on the worker; refused at once where it is sure to fail there.

        Without a gradient, torch back-propagates only from a one-element tensor. Where this
        pointer knows its shape locally (a sent tensor, or one fetched before), a tensor
        of more elements is refused here, with the error the worker would give, instead of
        failing on the worker where nothing awaits the result of ``backward()``. (The
        element count is checked, not the shape: in-place view operations such as
        ``unsqueeze_`` may make the known shape stale, but not the count.) Where the shape
        is unknown (a result whose shape depends on values, such as ``x[x > 0]``; see
        :mod:`fedtensor.client.meta`), the command is sent as it is, and
        its failure is raised by the next await of any pointer to this worker (or of the
        pointer this returns), once: the result is kept until then, up to
        :data:`MAX_UNCHECKED` of them per worker (older ones are then dropped unchecked).
        """
        gradient = args[0] if args else kwargs.get("gradient")
        shape = self._shape
        if gradient is None and shape is not None and math.prod(shape) != 1:
            raise RemoteError(
                "RuntimeError",
                "grad can be implicitly created only for scalar outputs (this tensor's "
                f"shape is {tuple(shape)}, known locally): pass a gradient, or reduce it "
                "first, e.g. x.sum().backward()",
                getattr(self.location, "id", "?"),
            )
        result: PointerBase = remote_call("Tensor.backward", (self, *args), kwargs)
        if result._error is not None:
            raise result._error  # known here (mixed workers, a consumed pointer): say so now
        # Remote parameters have a gradient from now on (fedtensor.client.modules).
        self.location._backward_calls += 1
        client = result._client
        if client is not None:
            if threading.get_ident() == client._thread:
                _keep_unchecked(result)
            else:  # the blocking API's thread: hop onto the loop, behind the command itself
                with contextlib.suppress(RuntimeError):  # a closed loop: the worker is gone
                    client.loop.call_soon_threadsafe(_keep_unchecked, result)
        return result

    def __getattr__(self, name: str) -> Any:
        if name in ATTRIBUTES:
            return remote_call(f"Tensor.{name}", (self,), {})
        op = f"Tensor.{name}"
        if op not in OPERATIONS:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r} "
                "(and it is not an allowed remote tensor operation)"
            )

        def method(*args: Any, **kwargs: Any) -> Any:
            return remote_call(op, (self, *args), kwargs)

        method.__name__ = name
        return method


#: How many results of unawaited ``backward()`` calls a worker handle keeps for the next
#: await to check; beyond it the oldest is dropped unchecked. It bounds what a loop that
#: never awaits keeps alive on the worker.
MAX_UNCHECKED = 64


def _keep_unchecked(result: PointerBase) -> None:
    unchecked = result.location._unchecked
    if len(unchecked) >= MAX_UNCHECKED:
        del unchecked[0]
    unchecked.append(result)


async def _fetch_checked(
    pointer: PointerBase, client: Client, *, free: bool, timeout: float | None
) -> Any:
    """Fetch ``pointer``'s value behind the results nothing awaited (see ``backward``).

    One command (``fedtensor.checked``) reads those results, then the object: it fails
    with the first failure among them, or is the object. Fetching it costs the same one
    round trip as a plain fetch. A failure is raised once (the results are dropped) and
    leaves the object to the pointer; the object is freed only once it came back.
    """
    unchecked, pointer.location._unchecked = pointer.location._unchecked, []
    refs = [Ref(result.id_at_location) for result in unchecked if result._client is client]
    checked_id = client.new_id()
    client.submit(
        Call(checked_id, "fedtensor.checked", (*refs, Ref(pointer.id_at_location)), _NO_KWARGS)
    )
    del unchecked  # released behind the check, not before it
    try:
        value = await client.fetch(checked_id, free=True, timeout=timeout)
    except BaseException:
        if free:
            pointer._client = client  # not taken: the object stays the pointer's
        raise
    if free:
        client.release(pointer.id_at_location)
    return value


def _torch_function(func: Any, args: Sequence[Any], kwargs: dict[str, Any] | None) -> Any:
    """A torch function called with pointers among its arguments: run it remotely."""
    name = FUNCTION_NAMES.get(func) or WORKER_FUNCTIONS.get(func)
    if name is None:
        qualname = getattr(func, "__qualname__", repr(func))
        raise ForbiddenOperation(
            "ForbiddenOperation", f"{qualname} is not an allowed remote operation", "?"
        )
    return remote_call(name, tuple(args), kwargs or {})


def _operator(name: str) -> Callable[..., Any]:
    op = f"Tensor.{name}"

    def method(self: Any, *args: Any) -> Any:
        return remote_call(op, (self, *args), {})

    method.__name__ = name
    return method


class _Operators:
    """Operator dunders (``__add__``, ``__getitem__``, ...) forwarding to the worker."""

    __slots__ = ()


for _name in sorted(OPERATIONS):
    if _name.startswith("Tensor.__"):
        _dunder = _name.removeprefix("Tensor.")
        setattr(_Operators, _dunder, _operator(_dunder))


class PointerTensor(PointerBase, _Operators):
    """A pointer to a tensor on a worker (async API).

    ``await ptr`` gives a copy of the remote value; ``await ptr.get()`` gives it
    and frees it on the worker. ``location`` is the worker, ``id_at_location``
    the object's id there, ``id`` this pointer's local id and ``owner`` the local
    worker. ``shape``/``dtype`` are known locally where no round trip is needed.
    """

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._fetch(free=False, timeout=None).__await__()

    async def get(self, *, timeout: float | None = None) -> Any:
        """Bring the value back and free it on the worker."""
        return await self._fetch(free=True, timeout=timeout)

    async def value(self, *, timeout: float | None = None) -> Any:
        """A copy of the remote value (what ``await ptr`` gives), with a timeout."""
        return await self._fetch(free=False, timeout=timeout)

    # -- between workers (fedtensor.client.transfer; README "Moving tensors between workers")

    async def move(self, location: WorkerHandle, *, timeout: float | None = None) -> Any:
        """Move the tensor to ``location`` (freed here); returns this pointer, now there."""
        return await _transfer.transfer(self, location, keep=False, timeout=timeout)

    async def copy(
        self, location: WorkerHandle | None = None, *, timeout: float | None = None
    ) -> Any:
        """A pointer to a copy on ``location`` (default: this worker); this one stays."""
        return await _transfer.transfer(self, location or self.location, keep=True, timeout=timeout)

    async def send(self, location: WorkerHandle, *, timeout: float | None = None) -> Any:
        """PySyft's ``send`` of a pointer: a pointer on ``location`` to this one; the tensor
        stays where it is (:func:`fedtensor.client.transfer.send_pointer`)."""
        return _transfer.send_pointer(self, location)

    async def remote_get(self, *, timeout: float | None = None) -> Any:
        """PySyft's ``remote_get()`` of a pointer to a pointer: the worker holding this
        pointer gets what it points to (the tensor moves there); returns ``self``."""
        return await _transfer.remote_get(self, timeout)


class SyncPointerTensor(PointerBase, _Operators):
    """A pointer to a tensor on a worker (blocking API of :mod:`fedtensor.sync`)."""

    __slots__ = ()

    def _blocking(self, free: bool, timeout: float | None) -> Any:
        client = self._client
        if client is None:
            if self._error is not None:
                raise type(self._error)(*self._error.args)
            raise PointerReleased(f"{self!r} was already consumed by get()")
        return client.run_threadsafe(self._fetch(free=free, timeout=timeout), timeout)

    def get(self, *, timeout: float | None = None) -> Any:
        """Bring the value back and free it on the worker (blocks)."""
        return self._blocking(True, timeout)

    def value(self, *, timeout: float | None = None) -> Any:
        """A copy of the remote value (blocks)."""
        return self._blocking(False, timeout)

    # -- between workers: the blocking twins of PointerTensor's --------------------------------

    def _run(self, coro: Any, timeout: float | None) -> Any:
        client = self._client
        if client is None:
            coro.close()
            if self._error is not None:
                raise type(self._error)(*self._error.args)
            raise PointerReleased(f"{self!r} was already consumed by get()")
        return client.run_threadsafe(coro, timeout)

    def move(self, location: WorkerHandle, *, timeout: float | None = None) -> Any:
        """Move the tensor to ``location`` (freed here); returns this pointer, now there."""
        return self._run(PointerTensor.move(self, location, timeout=timeout), timeout)  # type: ignore[arg-type]

    def copy(self, location: WorkerHandle | None = None, *, timeout: float | None = None) -> Any:
        """A pointer to a copy on ``location`` (default: this worker); this one stays."""
        return self._run(PointerTensor.copy(self, location, timeout=timeout), timeout)  # type: ignore[arg-type]

    def send(self, location: WorkerHandle, *, timeout: float | None = None) -> Any:
        """PySyft's ``send`` of a pointer (see :meth:`PointerTensor.send`)."""
        return self._run(PointerTensor.send(self, location, timeout=timeout), timeout)  # type: ignore[arg-type]

    def remote_get(self, *, timeout: float | None = None) -> Any:
        """Free the source a ``send`` left behind; returns ``self``."""
        return self._run(PointerTensor.remote_get(self, timeout=timeout), timeout)  # type: ignore[arg-type]

    def __await__(self) -> Generator[Any, None, Any]:
        # Lets a notebook cell with its own running loop `await` a blocking pointer.
        client = self._client
        if client is None:
            return self._fetch(free=False, timeout=None).__await__()
        future = asyncio.run_coroutine_threadsafe(
            self._fetch(free=False, timeout=None), client.loop
        )
        return asyncio.wrap_future(future).__await__()


class MultiPointerBase:
    """Pointers to copies of one tensor on several workers."""

    __slots__ = ("children",)

    def __init__(self, children: Sequence[PointerBase]) -> None:
        self.children: tuple[PointerBase, ...] = tuple(children)

    @property
    def location(self) -> list[WorkerHandle]:
        return [child.location for child in self.children]

    def __repr__(self) -> str:
        lines = [f"<{type(self).__name__}"]
        lines += [f"    {child!r}" for child in self.children]
        return "\n".join(lines) + ">"

    def __bool__(self) -> bool:
        raise TypeError("the truth value of remote tensors needs a round trip")

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _torch_function(func, args, kwargs)

    __getattr__ = PointerBase.__getattr__

    async def _gather(self, *, free: bool, timeout: float | None) -> list[Any]:
        return list(
            await asyncio.gather(
                *(child._fetch(free=free, timeout=timeout) for child in self.children)
            )
        )


class MultiPointerTensor(MultiPointerBase, _Operators):
    """Pointers to one tensor sent to several workers (async API)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self._gather(free=False, timeout=None).__await__()

    async def get(self, *, sum_results: bool = False, timeout: float | None = None) -> Any:
        """The values from every worker (freed there); ``sum_results`` adds them up."""
        values = await self._gather(free=True, timeout=timeout)
        return _sum(values) if sum_results else values


class SyncMultiPointerTensor(MultiPointerBase, _Operators):
    """Pointers to one tensor sent to several workers (blocking API)."""

    __slots__ = ()

    def get(self, *, sum_results: bool = False, timeout: float | None = None) -> Any:
        """The values from every worker (freed there); ``sum_results`` adds them up."""
        client = next((child._client for child in self.children if child._client), None)
        if client is None:
            raise PointerReleased(f"{self!r} was already consumed by get()")
        # One wait for all workers: the fetches run concurrently on the runtime's loop.
        values = client.run_threadsafe(self._gather(free=True, timeout=timeout), timeout)
        return _sum(values) if sum_results else values


def _sum(values: list[Any]) -> Any:
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


# -- dispatch -------------------------------------------------------------------------------------


class _Spread(Exception):
    """Raised inside argument conversion when a multi-pointer is met."""


class _Target:
    """The one worker an operation runs on, found while converting its arguments."""

    __slots__ = ("client", "error", "links", "location", "pointer_class")

    def __init__(self) -> None:
        self.client: Client | None = None
        self.location: WorkerHandle | None = None
        self.error: FedTensorError | None = None
        self.pointer_class: type[PointerBase] | None = None
        # The clients of the links of a pointer to a pointer among the arguments
        # (outermost first): every pointer argument must come through the same ones.
        self.links: tuple[Client, ...] | None = None


_SCALARS = frozenset({int, float, bool, complex, str, type(None), type(...), slice, torch.dtype})
_NO_KWARGS: dict[str, Any] = {}  # shared by every call without keyword arguments; never mutated


def _wire(value: Any, target: _Target) -> Any:
    """``value`` as it travels: pointers become ``Ref``s, local tensors copies."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is PointerTensor or kind is SyncPointerTensor or isinstance(value, PointerBase):
        return _wire_pointer(value, target)
    if isinstance(value, MultiPointerBase):
        raise _Spread
    if kind is list:
        return [_wire(item, target) for item in value]
    if kind is tuple or kind is torch.Size:
        return tuple(_wire(item, target) for item in value)
    if kind is dict:
        return {key: _wire(item, target) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        # A remote model's parameter or gradient (fedtensor.client.modules) is a pointer.
        remote = getattr(value, "_fedtensor_pointer", None)
        if remote is not None:
            return _wire_pointer(remote, target)
        return snapshot(value)  # the worker must not see later local changes
    if kind is torch.device:
        # A device travels as its name, which torch takes wherever it takes a device
        # (``x.to("cpu")``); the worker's torch refuses a device it lacks, as it would here.
        return str(value)
    raise TypeError(
        f"a {type(value).__qualname__} cannot be sent to a worker: arguments of remote "
        "operations are tensors, pointers, numbers, strings, dtypes, devices, slices "
        "and lists, tuples or dicts of those"
    )


def _wire_pointer(pointer: PointerBase, target: _Target) -> Ref | None:
    if target.pointer_class is None:
        target.pointer_class = type(pointer)
    if pointer._origin is not None or target.links:
        chained = _through_links(pointer, target)
        if chained is None:
            return None
        pointer = chained
    client = pointer._client
    if client is not None and client is target.client:
        return Ref(pointer.id_at_location)  # the common case: another pointer on the same worker
    if pointer._error is not None or client is None:
        if target.error is None:
            target.error = pointer._error or PointerReleased(
                f"{pointer!r} was already consumed by get()"
            )
            target.location = pointer.location
        return None
    if target.client is None:
        target.client = client
        target.location = pointer.location
        return Ref(pointer.id_at_location)
    if target.error is None:
        target.error = LocationError(
            f"an operation mixes tensors on worker {target.client.worker.id!r} "
            f"and worker {client.worker.id!r}; move one to the other's worker first: "
            f"`await ptr.move({target.client.worker.id})` (`ptr.move(...)` in fedtensor.sync), "
            "or `await ptr.copy(worker)` to keep the original"
        )
    return None


def _through_links(pointer: PointerBase, target: _Target) -> PointerBase | None:
    """A pointer to a pointer as an argument: the pointer to its data, where the operation
    runs (PySyft's alice forwarded it to bob; here the client, which knows the chain,
    sends it to bob itself). Its links must be every pointer argument's links."""
    data, links = _transfer.chain_of(pointer)
    clients = tuple(link._client for link in links)
    released = next((link for link in links if link._client is None), None)
    if released is not None and target.error is None:
        target.error = PointerReleased(f"{released!r} was already consumed by get()")
        target.location = released.location
    if target.links is None and target.client is None and target.error is None:
        target.links = clients  # type: ignore[assignment]
    elif target.links != clients and target.error is None:
        target.error = LocationError(
            "an operation mixes pointers to pointers through different workers (or with "
            "plain pointers); get() one level first, or move the data: `ptr.move(worker)`"
        )
        target.location = pointer.location
    return None if target.error is not None else data


def remote_call(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Queue ``op(*args, **kwargs)`` on the worker the pointers in it live on."""
    target = _Target()
    try:
        wire_args = tuple([_wire(arg, target) for arg in args])
        wire_kwargs = (
            {key: _wire(value, target) for key, value in kwargs.items()} if kwargs else _NO_KWARGS
        )
    except _Spread:
        spread = True
    else:
        spread = False
    if spread:
        # Outside the except block, so no traceback pins the arguments' pointers.
        return _spread_call(op, args, kwargs)
    pointer_class = target.pointer_class
    if pointer_class is None:
        raise TypeError(f"{op} was dispatched without a pointer among its arguments")
    if target.error is not None:
        assert target.location is not None
        return pointer_class.failed(target.location, target.error)
    client = target.client
    assert client is not None
    id_ = client.new_id()
    if torch.is_grad_enabled() or (op.startswith("fedtensor.") and op not in _GRAD_MODE_OPS):
        client.submit(Call(id_, op, wire_args, wire_kwargs))
    else:  # the client's torch.no_grad() reaches the worker with each operation it encloses
        client.submit(Call(id_, "fedtensor.no_grad", (op, *wire_args), wire_kwargs))
    result = client.pointer_class(client, id_)
    described = infer(op, args, kwargs, PointerBase)
    if described is not None:
        result = _described(result, op, args, described)
    if target.links:  # operands were pointers to pointers: so is the result
        return _transfer.chain_result(result, target.links)
    return result


# fedtensor's own operations that run under the client's grad mode (torch's all do).
_GRAD_MODE_OPS = frozenset({"fedtensor.autograd_grad", "fedtensor.set_attribute"})


def _described(result: PointerBase, op: str, args: tuple[Any, ...], described: Any) -> Any:
    """``result`` with its shape and dtype, or one pointer per element of a tuple result.

    The elements are taken out of the worker's tuple by ``fedtensor.element`` commands
    queued behind the operation, each under an id of its own, so each is usable at once;
    the tuple itself is released behind them.
    """
    first, second = described
    if type(first) is tuple:  # one tensor: (shape, dtype)
        result._shape, result._dtype = first, second
        name = op.rpartition(".")[2]
        if name[-1] == "_" and name[0] != "_" and args and isinstance(args[0], PointerBase):
            # An in-place operation returns its tensor: unsqueeze_ and friends reshape it.
            args[0]._shape, args[0]._dtype = first, second
        return result
    client = result._client
    assert client is not None
    tuple_ref = Ref(result.id_at_location)
    elements = []
    for index, (shape, dtype) in enumerate(second):
        element_id = client.new_id()
        client.submit(Call(element_id, "fedtensor.element", (tuple_ref, index), _NO_KWARGS))
        elements.append(client.pointer_class(client, element_id, shape, dtype))
    return first(elements)


def call_on(client: Client, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Queue ``op(*args, **kwargs)`` on ``client``'s worker, pointers among the arguments or not."""
    target = _Target()
    target.client = client
    target.location = client.worker
    target.pointer_class = client.pointer_class
    try:
        wire_args = tuple([_wire(arg, target) for arg in args])
        wire_kwargs = {key: _wire(value, target) for key, value in kwargs.items()}
    except _Spread:
        raise TypeError(f"{op} takes pointers to one worker, not multi-pointers") from None
    if target.error is not None:
        return client.pointer_class.failed(client.worker, target.error)
    id_ = client.new_id()
    client.submit(Call(id_, op, wire_args, wire_kwargs))
    return client.pointer_class(client, id_)


def _spread_call(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a multi-pointer operation once per worker, pairing children by worker."""
    multis = [arg for arg in (*args, *kwargs.values()) if isinstance(arg, MultiPointerBase)]
    first = multis[0]
    locations = [id(child.location) for child in first.children]
    by_location: list[dict[int, PointerBase]] = []
    for multi in multis:
        children = {id(child.location): child for child in multi.children}
        if set(children) != set(locations):
            raise LocationError("multi-pointers in one operation must span the same workers")
        by_location.append(children)

    def pick(value: Any, where: int) -> Any:
        if isinstance(value, MultiPointerBase):
            # By identity: `==` on pointers is a remote operation.
            index = next(i for i, multi in enumerate(multis) if multi is value)
            return by_location[index][where]
        return value

    results = [
        remote_call(
            op,
            tuple(pick(arg, where) for arg in args),
            {key: pick(value, where) for key, value in kwargs.items()},
        )
        for where in locations
    ]
    multi_class = (
        SyncMultiPointerTensor if isinstance(first, SyncMultiPointerTensor) else MultiPointerTensor
    )
    if isinstance(results[0], (tuple, list)):  # a multi-output operation: a multi-pointer each
        return type(results[0])([multi_class(parts) for parts in zip(*results, strict=True)])
    return multi_class(results)


class LocalWorker:
    """This program, as the owner of every pointer it holds."""

    id = "me"

    def __repr__(self) -> str:
        return "<LocalWorker id:me>"


_LOCAL = LocalWorker()


def local_worker() -> LocalWorker:
    """The local worker (``me``): the ``owner`` of every pointer."""
    return _LOCAL
