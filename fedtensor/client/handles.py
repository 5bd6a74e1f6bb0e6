"""Worker handles: what user code holds to reach a worker.

- :class:`VirtualWorker` runs a worker actor in this process and is its handle.
- :func:`connect` reaches a worker by URL (``memory://ID``, ``ws://``, ``wss://``) as a new client
  with its own namespace.
- :func:`local_worker` is the program itself, the ``owner`` of every pointer.
- :func:`send` sends a tensor to one worker (a pointer) or to several at once
  (a multi-pointer); every send is queued at once, so they run concurrently.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, overload

import anyio
import anyio.abc
import torch

from fedtensor.client import transfer as _transfer
from fedtensor.client.engine import Client
from fedtensor.client.modules import send_model
from fedtensor.client.pointer import (
    LocalWorker,
    MultiPointerTensor,
    PointerBase,
    PointerTensor,
    SyncMultiPointerTensor,
    SyncPointerTensor,
    local_worker,
)
from fedtensor.errors import FedTensorError

__all__ = [
    "DEFAULT_TIMEOUT",
    "LocalWorker",
    "ReadOnlyDict",
    "RemoteWorker",
    "WorkerGroup",
    "WorkerHandle",
    "connect",
    "encode_by_default",
    "local_worker",
    "require_asyncio",
    "send",
]

#: Seconds any wait on a worker lasts before ``ft.TimeoutError``, unless told otherwise.
DEFAULT_TIMEOUT = 60.0

#: Set to 1 to make in-process workers encode every batch to wire frames by default.
ENCODE_VARIABLE = "FEDTENSOR_MEMORY_ENCODE"


def encode_by_default() -> bool:
    """Whether in-process workers encode batches unless told otherwise."""
    return os.environ.get(ENCODE_VARIABLE, "") not in ("", "0")


def require_asyncio(entry: str) -> None:
    """Raise a :class:`FedTensorError` unless an asyncio event loop runs in this thread.

    fedtensor's runtime is asyncio's own futures, handles and protocols, so under
    trio (anyio's trio backend included) it would fail deep inside with an
    ``AttributeError``; this says why at the door instead. A plain
    :class:`FedTensorError`: it is a mistake in how the program is run, not a
    condition to catch and handle, like a blocking call made on the runtime's loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise FedTensorError(
            f"{entry} needs a running asyncio event loop: fedtensor runs on asyncio "
            "(uvloop too), not trio; run it with asyncio.run() or with anyio's asyncio "
            "backend, anyio.run(main, backend='asyncio')"
        ) from None


class WorkerHandle:
    """A client's handle to one worker: pointers to it are made through it."""

    def __init__(self, id: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.id = id
        self.timeout = timeout
        self._client: Client | None = None
        # Set by fedtensor.sync: pointers to this worker then block instead of awaiting.
        self._blocking = False
        # Results of commands that nothing awaits (``backward()``), checked by the next
        # await of a pointer to this worker so that their failure is not lost (see
        # PointerBase.backward). Used on the client's loop thread only.
        self._unchecked: list[PointerBase] = []
        # backward() calls sent to this worker: a remote model's parameter has a
        # gradient once one was sent after its gradient was last set to None
        # (fedtensor.client.modules).
        self._backward_calls = 0

    @property
    def client(self) -> Client:
        if self._client is None:
            raise FedTensorError(f"worker handle {self.id!r} is not open (use `async with`)")
        return self._client

    async def _open_client(self, url: str, **options: Any) -> None:
        client = Client(
            self,
            timeout=self.timeout,
            pointer_class=SyncPointerTensor if self._blocking else PointerTensor,
        )
        await client.connect(url, **options)
        if client.worker_name is not None:
            self.id = client.worker_name
        self._client = client

    async def aclose(self) -> None:
        """Close the connection; pending pointers fail with WorkerUnavailable (idempotent)."""
        client = self._client
        if client is not None:
            # A close is clean-up: it runs to its end even in a cancelled scope (the
            # transport's own close timeout bounds it), or a half-closed socket leaks.
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def object_ids(self, *, timeout: float | None = None) -> list[int]:
        """The ids of every object this client holds on the worker (one round trip)."""
        return await self.client.list_objects(timeout=timeout)

    def clear_objects(self, *, timeout: float | None = None) -> Any:
        """Free every object this client holds on the worker; returns the handle.

        ``await worker.clear_objects()`` on an async handle; a blocking handle's
        (:mod:`fedtensor.sync`) call blocks until it is done, as PySyft's did. Commands
        sent before it run first; pointers to the freed objects then fail with
        :class:`~fedtensor.ObjectNotFound`. Other clients' objects are theirs to free.
        """
        if self._blocking:
            self.client.run_threadsafe(self._clear_objects(timeout), timeout)
            return self
        return self._clear_objects(timeout)

    async def _clear_objects(self, timeout: float | None) -> WorkerHandle:
        client = self.client
        # The listing runs behind every command queued so far, so it includes their
        # results; the releases then go out at once as one Release, ahead of anything
        # sent after this (a later snapshot or listing sees them gone).
        for id_ in await client.list_objects(timeout=timeout):
            client.release(id_)
        client.drain()
        self._unchecked.clear()  # their objects are gone: nothing left to check
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id:{self.id}>"

    def search(self, *query: Any, timeout: float | None = None) -> Any:
        """Pointers to what matches every term of ``query`` (PySyft's ``search``).

        The client's own objects tagged or described so (``ft.send(..., tags=...)``,
        ``ptr.tag(...)``), then the data sets the worker holds (tagged with their name,
        ``#name``, ``#data`` or ``#target``, and what the worker was told). One round
        trip; never another client's objects. ``await worker.search("#mnist")``; a
        blocking handle's (:mod:`fedtensor.sync`) call blocks.
        """
        terms = _transfer.search_terms(query)
        if self._blocking:
            return self.client.run_threadsafe(_transfer.search(self, terms, timeout), timeout)
        return _transfer.search(self, terms, timeout)


class ReadOnlyDict(Mapping[int, Any]):
    """A read-only snapshot that prints like the dict PySyft users know.

    Its one mutation is PySyft's ``worker._objects.clear()``: given ``clear`` (a
    blocking worker's :meth:`WorkerHandle.clear_objects`), it frees this client's
    objects on the worker and empties the snapshot. Anything else that would change
    it raises a :class:`TypeError`: a snapshot is not the worker's store.
    """

    def __init__(
        self, items: Iterator[tuple[int, Any]], *, clear: Callable[[], object] | None = None
    ) -> None:
        self._data = dict(items)
        self._clear = clear

    def clear(self) -> None:
        """Free every object this client holds on the worker (PySyft's ``_objects.clear()``)."""
        if self._clear is None:
            raise TypeError(
                "these objects are a snapshot; free them on the worker with "
                "`await worker.clear_objects()`"
            )
        self._clear()
        self._data.clear()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "a worker's objects are a read-only snapshot: send tensors to the worker to add "
            "objects, drop (or get()) their pointers to free them, or clear() them all"
        )

    __setitem__ = __delitem__ = pop = popitem = setdefault = update = _refuse

    def __getitem__(self, key: int) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


class RemoteWorker(WorkerHandle):
    """A handle to a worker reached by URL (see :func:`connect`)."""

    @property
    def objects(self) -> Mapping[int, Any]:
        """Copies of this client's objects on the worker, by id (blocking handles only).

        It asks the worker (a round trip per object): async code should use
        ``await worker.object_ids()`` and await pointers instead.
        """
        if not self._blocking:
            raise TypeError("objects of a remote worker need a round trip: use object_ids()")
        return self.client.run_threadsafe(self._fetch_objects(), None)  # type: ignore[no-any-return]

    _objects = objects

    async def _fetch_objects(self) -> Mapping[int, Any]:
        client = self.client
        ids = await client.list_objects()
        values = await asyncio.gather(*(client.fetch(id_, free=False) for id_ in ids))
        return ReadOnlyDict(iter(zip(ids, values, strict=True)), clear=self.clear_objects)

    def __repr__(self) -> str:
        return f"<RemoteWorker id:{self.id} {self.url}>"

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        from urllib.parse import urlsplit

        super().__init__(urlsplit(url).netloc or url, timeout=timeout)
        self.url = url

    async def open(self, **options: Any) -> RemoteWorker:
        """Connect as a new client (``options`` as for :func:`connect`); returns ``self``."""
        require_asyncio("ft.connect")
        with anyio.fail_after(self.timeout):
            await self._open_client(self.url, **options)
        return self

    async def __aenter__(self) -> RemoteWorker:
        # ``async with ft.RemoteWorker(url)`` opens it; a handle from ``ft.connect`` is open.
        return self if self._client is not None else await self.open()

    async def reconnect(self) -> None:
        """Connect again after a lost connection (a restarted worker, a network drop).

        With ``session=NAME`` given to :func:`connect`, the worker kept this
        client's objects for a while, and the pointers made before work again.
        """
        await self.client.reconnect()


class _Connecting:
    """``await ft.connect(url)`` or ``async with ft.connect(url) as worker``."""

    def __init__(self, url: str, timeout: float, options: dict[str, Any]) -> None:
        self._worker = RemoteWorker(url, timeout=timeout)
        self._options = options

    async def _open(self) -> RemoteWorker:
        return await self._worker.open(**self._options)

    def __await__(self) -> Generator[Any, None, RemoteWorker]:
        return self._open().__await__()

    async def __aenter__(self) -> RemoteWorker:
        return await self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._worker.aclose()


def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT, **options: Any) -> _Connecting:
    """Connect to the worker at ``url`` as a new client with its own namespace.

    ``options`` go to the transport: for ``ws://`` and ``wss://``, ``token``,
    ``ssl``, ``session`` (a name under which the worker keeps this client's
    objects across a reconnection: use a long random one, it is a secret), and
    see :mod:`fedtensor.transports.websocket` for the rest.
    """
    return _Connecting(url, timeout, options)


def send(
    tensor: torch.Tensor | torch.nn.Module,
    *workers: WorkerHandle,
    tags: Iterable[str] | None = None,
    description: str | None = None,
) -> Any:
    """Send a copy of ``tensor`` to each worker.

    One worker gives a :class:`PointerTensor`, several a
    :class:`MultiPointerTensor`. Returns at once: the transfers run in the
    background, concurrently, and the local tensor may be changed right away.
    ``tags`` and ``description`` (or those set on the tensor by ``t.tag(...)`` and
    ``t.describe(...)`` after ``sy.TorchHook``) let ``worker.search`` find it.
    A ``torch.nn.Module`` is sent to one worker as a remote model, and returned
    (:mod:`fedtensor.client.modules`).
    """
    if not workers:
        raise TypeError("send() needs at least one worker")
    if isinstance(tensor, torch.nn.Module):  # a remote model (fedtensor.client.modules)
        return send_model(tensor, *workers)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"send() takes a torch.Tensor, not {type(tensor).__name__}")
    pointers: list[PointerBase] = [worker.client.store(tensor) for worker in workers]
    tags = [*(getattr(tensor, "tags", None) or ()), *(tags or ())]
    if description is None:
        description = getattr(tensor, "description", None)
    if tags or description is not None:
        for pointer in pointers:
            _transfer.describe(pointer, tags, description)
    if len(pointers) == 1:
        return pointers[0]
    blocking = all(worker._blocking for worker in workers)
    return (SyncMultiPointerTensor if blocking else MultiPointerTensor)(pointers)


_Handle = TypeVar("_Handle", bound=WorkerHandle)


class WorkerGroup(Sequence[_Handle], Generic[_Handle]):
    """Workers started together (``ft.local_workers``, ``ft.ray.workers``): a sequence of
    their handles, opened by :meth:`start` or ``async with``, closed by :meth:`aclose`.
    A subclass sets ``_handles`` once started and says how to start and stop."""

    _handles: list[_Handle]

    @overload
    def __getitem__(self, index: int) -> _Handle: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[_Handle]: ...
    def __getitem__(self, index: int | slice) -> _Handle | Sequence[_Handle]:
        return self._handles[index]

    def __len__(self) -> int:
        return len(self._handles)

    def __iter__(self) -> Iterator[_Handle]:
        return iter(self._handles)

    async def start(self) -> Self:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
