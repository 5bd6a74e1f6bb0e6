"""The client engine: one per worker handle.

Theory of operation
-------------------
Every pointer operation becomes a command appended to the client's *outbox*;
nothing waits. The outbox is flushed to the connection as one batch at the
next turn of the event loop (``call_soon``), so a burst of pipelined
operations travels as one batch, and a transport can put it in one frame.
Awaiting a pointer appends a ``Fetch`` and flushes at once; the reply resolves
a future registered under the fetch's request number. ``fetch_soon`` appends the
``Fetch`` without flushing: it travels with the commands queued before it, in
their frame.

The client names result ids itself (a counter from a random start), which is
what lets dependent commands be sent before their inputs exist.

Remote garbage collection: a pointer's ``__del__`` calls :meth:`Client.release`.
Releases are appended to the outbox *after* every command that used the id, so
they can never overtake them; consecutive releases coalesce into one
``Release`` message at flush.

Threads: the engine lives on one event loop. ``submit`` and ``release`` may be
called from any thread (the blocking facade runs user code on its own thread,
and ``__del__`` runs wherever the last reference dies): off the loop's thread
they hop onto it with ``call_soon_threadsafe``, which keeps their order.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import random
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedtensor.abc import Connection
from fedtensor.client.registry import transport_for
from fedtensor.errors import (
    FedTensorError,
    ForbiddenOperation,
    LimitExceeded,
    ObjectNotFound,
    ProtocolError,
    RemoteError,
    TimeoutError,
    WorkerUnavailable,
)
from fedtensor.protocol.messages import (
    Command,
    Failure,
    Fetch,
    ListObjects,
    Message,
    Release,
    Reply,
    Store,
)
from fedtensor.protocol.values import snapshot

if TYPE_CHECKING:
    from fedtensor.client.handles import WorkerHandle
    from fedtensor.client.pointer import PointerBase

__all__ = [
    "CALLER_RUNS_THRESHOLD",
    "Client",
    "error_from_failure",
    "mark_retrieved",
    "run_on_loop",
]

#: Commands a client queues before it sends them without waiting for the next
#: turn of the event loop; an in-process worker's client then runs them itself
#: (see ``Client.submit``).
CALLER_RUNS_THRESHOLD = 512

_REMOTE_ERRORS: dict[str, type[RemoteError]] = {
    "forbidden": ForbiddenOperation,
    "not_found": ObjectNotFound,
}


def error_from_failure(failure: Failure, worker: str) -> FedTensorError:
    """The exception a client raises for a ``Failure`` reply."""
    if failure.kind == "limit":
        return LimitExceeded(f"{failure.error_type} on worker {worker!r}: {failure.message}")
    if failure.kind == "protocol":
        return ProtocolError(f"worker {worker!r} could not read a command: {failure.message}")
    return _REMOTE_ERRORS.get(failure.kind, RemoteError)(
        failure.error_type, failure.message, worker
    )


class Client:
    """Ids, the outbox and pending fetches of one connection to one worker."""

    def __init__(
        self, worker: WorkerHandle, *, timeout: float, pointer_class: type[PointerBase]
    ) -> None:
        self.worker = worker
        self.timeout = timeout
        self.pointer_class = pointer_class
        self.loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._connection: Connection | None = None
        self._url = ""
        self._options: dict[str, Any] = {}
        self._in_process = False
        self.worker_name: str | None = None
        self._outbox: list[Command | int] = []
        self._flush_handle: asyncio.Handle | None = None
        # Ids start at a random point so that ids say nothing about other sessions.
        self._ids = itertools.count(random.getrandbits(40))
        self._requests = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._unavailable: str | None = "not connected yet"
        self._unavailable_type: type[FedTensorError] = WorkerUnavailable

    # -- life cycle ------------------------------------------------------------------------------

    async def connect(self, url: str, **options: Any) -> None:
        self._url, self._options = url, options
        self._connection = await transport_for(url).connect(
            url, self, timeout=self.timeout, **options
        )
        self._in_process = self._connection.in_process
        self.worker_name = self._connection.worker_id
        self._unavailable = None
        self._unavailable_type = WorkerUnavailable

    async def reconnect(self) -> None:
        """Connect again to the same URL with the same options, after a lost connection.

        Pointers made before stay valid where the worker kept their objects (a
        named session); commands sent while disconnected were dropped.
        """
        old, self._connection = self._connection, None
        if old is not None and self._unavailable is None:
            self._fail_pending("reconnecting")
            await old.aclose()
        await self.connect(self._url, **self._options)

    async def aclose(self) -> None:
        """Send what is queued, close the connection, fail pending fetches."""
        if self._connection is None or self._unavailable is not None:
            return
        self._flush()
        connection, self._connection = self._connection, None
        self._fail_pending(f"the connection to worker {self.worker.id!r} was closed")
        await connection.aclose()

    def connection_lost(self, exc: BaseException | None) -> None:
        # A transport reports why with a fedtensor error (a limit, a protocol error);
        # anything else means the worker went away.
        if isinstance(exc, FedTensorError):
            self._unavailable_type = type(exc)
        self._fail_pending(f"lost the connection to worker {self.worker.id!r}: {exc}")

    def _unavailable_error(self) -> FedTensorError:
        return self._unavailable_type(self._unavailable)

    def _fail_pending(self, reason: str) -> None:
        self._unavailable = reason
        self._outbox.clear()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._unavailable_error())

    @property
    def available(self) -> bool:
        return self._unavailable is None

    # -- commands --------------------------------------------------------------------------------

    def new_id(self) -> int:
        return next(self._ids)

    def submit(self, command: Command) -> None:
        """Queue a command; it reaches the worker at the next flush. Any thread."""
        if threading.get_ident() != self._thread:
            self.loop.call_soon_threadsafe(self.submit, command)
            return
        if self._unavailable is not None:
            return  # a fetch will report why; commands to a gone worker are moot
        outbox = self._outbox
        outbox.append(command)
        if len(outbox) >= CALLER_RUNS_THRESHOLD:
            if self._in_process:
                # Backpressure for in-process workers: a burst that outruns the worker
                # is run by the caller (like a caller-runs queue policy), which bounds
                # what a pipeline keeps alive: objects on the worker, garbage for the
                # collector.
                self.drain()
            else:
                # A remote worker starts on a long burst while the rest is made.
                self._flush()
            return
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def release(self, id_: int) -> None:
        """Free the remote object ``id_`` once the commands queued before it ran."""
        if threading.get_ident() != self._thread:
            # A closed loop (RuntimeError) means the worker is gone with it.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.release, id_)
            return
        if self._unavailable is not None:
            return
        # A bare id in the outbox stands for "release it"; runs of them become one
        # Release at flush. Ints keep a long pipelined burst cheap for the collector.
        self._outbox.append(id_)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # a no-op when the flush is that call itself
            self._flush_handle = None
        outbox = self._outbox
        if not outbox or self._connection is None:
            return
        self._outbox = []
        batch: list[Command] = []
        releases: list[int] = []
        for item in outbox:
            if type(item) is int:
                releases.append(item)
                continue
            if releases:
                batch.append(Release(tuple(releases)))
                releases = []
            batch.append(item)  # type: ignore[arg-type]
        if releases:
            batch.append(Release(tuple(releases)))
        self._connection.send(batch)

    def store(self, value: Any) -> PointerBase:
        """Send a copy of ``value`` (a tensor, or any wire value); returns its pointer at once."""
        id_ = self.new_id()
        self.submit(Store(id_, snapshot(value)))
        if isinstance(value, torch.Tensor):
            return self.pointer_class(self, id_, tuple(value.shape), value.dtype)
        return self.pointer_class(self, id_)

    # -- replies ---------------------------------------------------------------------------------

    async def fetch(self, id_: int, *, free: bool, timeout: float | None = None) -> Any:
        """The value of remote object ``id_`` (``free`` also deletes it there)."""
        return await self._ask(lambda request: Fetch(request, id_, free), timeout)

    def fetch_soon(
        self, id_: int, *, free: bool, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """The value of remote object ``id_``, as a future, the fetch queued behind the
        commands queued so far. On the client's loop.

        The fetch goes to the worker in the same frame as those commands, at the next
        flush: a command and its result cost one frame each way. ``await fetch(...)``
        sends its fetch at once, so a caller that queues a command and awaits its
        result in a task started after (one per worker, as ``ft.fit`` does) sends two
        frames: one more send, wake-up and decoding, and the client must get a core
        back between them. ``timeout`` (the handle's when None) bounds the
        wait from now; the future's failure counts as retrieved, so a caller may give
        up on it (a round's timeout) without asyncio logging it. An in-process worker
        runs the frame from the loop (its mailbox's callback), not on the caller's stack.
        """
        if threading.get_ident() != self._thread:
            raise FedTensorError("fetch_soon is for the client's event loop, not another thread")
        future: asyncio.Future[Any] = self.loop.create_future()
        if self._unavailable is not None:
            future.set_exception(self._unavailable_error())
            mark_retrieved(future)
            return future
        request = next(self._requests)
        self._outbox.append(Fetch(request, id_, free))
        self._pending[request] = future
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        limit = self.timeout if timeout is None else timeout
        timer = self.loop.call_later(limit, _expire, future, self.worker.id, limit)

        def settled(future: asyncio.Future[Any]) -> None:
            timer.cancel()
            self._pending.pop(request, None)
            mark_retrieved(future)

        future.add_done_callback(settled)
        return future

    async def list_objects(self, *, timeout: float | None = None) -> list[int]:
        """The ids of every object this client has on the worker."""
        ids: list[int] = await self._ask(ListObjects, timeout)
        return ids

    async def _ask(self, make: Callable[[int], Command], timeout: float | None) -> Any:
        """Send the question ``make(request)`` and wait for its answer."""
        if self._unavailable is not None:
            raise self._unavailable_error()
        request = next(self._requests)
        future: asyncio.Future[Any] = self.loop.create_future()
        self._outbox.append(make(request))
        self._pending[request] = future
        try:
            if self._in_process:
                # Caller runs: an in-process worker answers on this stack, with no
                # turn of the event loop and no timer, when nothing else is queued.
                self.drain()
            else:
                self._flush()
        except BaseException:
            del self._pending[request]
            raise
        if future.done():
            self._pending.pop(request, None)
            return future.result()
        limit = self.timeout if timeout is None else timeout
        timer = self.loop.call_later(limit, _expire, future, self.worker.id, limit)
        try:
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request, None)

    def replies_received(self, batch: Sequence[Message]) -> None:
        pending = self._pending
        for reply in batch:
            future = pending.pop(reply.request, None)  # type: ignore[union-attr]
            if future is None or future.done():
                continue  # timed out or cancelled meanwhile
            if type(reply) is Reply:
                future.set_result(reply.value)
            elif type(reply) is Failure:
                future.set_exception(error_from_failure(reply, self.worker.id))

    # -- in-process and cross-thread helpers -----------------------------------------------------

    def drain(self) -> None:
        """Flush, and make an in-process worker run everything sent so far."""
        self._flush()
        if self._connection is not None and self._connection.in_process:
            self._connection.drain()

    def run_threadsafe(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        """Run ``coro`` on the client's loop from another thread and wait for it."""
        limit = self.timeout if timeout is None else timeout
        # The coroutine enforces `limit` itself; the extra second covers the hand-off.
        return run_on_loop(
            self.loop, coro, limit + 1.0, f"no answer from worker {self.worker.id!r} in {limit} s"
        )


def run_on_loop(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    timeout: float | None,
    timeout_message: str,
) -> Any:
    """Run ``coro`` on ``loop`` (another thread's) and wait up to ``timeout`` (None: no limit)."""
    if _running_loop() is loop:  # waiting here would block the loop that must answer
        coro.close()
        raise FedTensorError(
            "a blocking fedtensor.sync call was made on the runtime's own event loop; "
            "use the async API there"
        )
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError as exc:  # the loop is closed: fedtensor.sync.shutdown() has run
        coro.close()
        raise WorkerUnavailable(
            "the fedtensor runtime was shut down (fedtensor.sync.shutdown), closing its workers"
        ) from exc
    try:
        return future.result(timeout)
    except TimeoutError:
        raise
    except builtins.TimeoutError as exc:
        future.cancel()
        raise TimeoutError(timeout_message) from exc


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """Mark ``future``'s failure as seen (a caller may give up on it)."""
    if not future.cancelled():
        future.exception()


def _expire(future: asyncio.Future[Any], worker: str, limit: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"no answer from worker {worker!r} in {limit} s"))
