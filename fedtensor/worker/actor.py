"""The worker actor: a mailbox, an object store per client, and the command loop.

Theory of operation
-------------------
A :class:`WorkerActor` owns its objects. Transports (in-memory, websocket) do
not touch the store: for every client that connects they open a
:class:`Session`, hand it batches of decoded commands with
:meth:`Session.submit`, and receive the replies through the ``deliver``
callback they passed in. Each session is a namespace: ids name objects of that
session only, so one client can neither read nor guess another's objects.

All batches go through one FIFO mailbox and are executed one at a time, so the
commands of one client run in the order they were sent and a pipelined chain is
correct without waiting. Executing a batch (:meth:`WorkerActor.execute`) is plain
synchronous code with no I/O: it is what the unit tests drive directly.

An in-process actor has no task of its own: the first letter posted to an empty
mailbox schedules one callback on the running event loop (``call_soon``) that
runs every letter queued by then (:meth:`WorkerActor.drain`), and a caller that
needs an answer now runs the mailbox itself on its own stack (the client's
caller-runs path). So an open in-process worker costs no task, no cancel scope
and nothing per turn of the loop; it can be opened and closed from any task in
any order, and :meth:`WorkerActor.close` is synchronous and complete: the
mailbox is emptied and every object freed at once.

A worker serving a network runs its mailbox on a thread of its own, so that
its event loop stays free for I/O while an operation computes. Handing a batch
to that thread and its replies back costs about 120 microseconds here, more
than a small operation itself, so :meth:`WorkerActor.run_inline` runs the
commands that are provably cheap (see :mod:`fedtensor.worker.inline`) on the caller's
thread instead, when the actor is idle: nothing queued, nothing running. The
order of commands is kept: the first command that is not cheap, and every
command after it, goes through the mailbox.

A command that fails stores a :class:`Failed` marker under its result id; any
later command reading that id fails with the same marker, and a fetch of it is
answered with a :class:`~fedtensor.protocol.messages.Failure`. The worker itself never
stops on a bad command.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch

from fedtensor.errors import ForbiddenOperation, ProtocolError, WorkerUnavailable
from fedtensor.protocol.messages import (
    Call,
    Failure,
    Fetch,
    ListObjects,
    Message,
    Ref,
    Release,
    Reply,
    Store,
)
from fedtensor.protocol.ops import OPERATIONS, WORKER_OPERATIONS
from fedtensor.protocol.values import snapshot, tensor_bytes
from fedtensor.worker.failed import Failed
from fedtensor.worker.inline import MAX_COMMANDS as INLINE_MAX_COMMANDS
from fedtensor.worker.inline import is_cheap
from fedtensor.worker.local_update import local_update

__all__ = ["Failed", "Session", "WorkerActor", "in_process_workers", "snapshot", "tensor_bytes"]

# Workers running in this process, by id: what ``memory://ID`` URLs name.
_in_process: dict[str, WorkerActor] = {}


def in_process_workers() -> dict[str, WorkerActor]:
    """The registry of in-process workers by id (the in-memory transport reads it)."""
    return _in_process


class _Unresolved(Exception):
    """Raised while resolving arguments that name a failed or unknown object."""

    def __init__(self, failed: Failed) -> None:
        self.failed = failed


_log = logging.getLogger("fedtensor.worker")

# (session, batch) runs a batch; (session, None) ends a session; (None, callback) is a
# barrier; (None, None) wakes a threaded actor so it sees it is closed.
_Letter: TypeAlias = "tuple[Session | None, Sequence[Message] | Callable[[], None] | None]"


def _storage_users(tensor: torch.Tensor) -> int:
    return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))


# What _storage_users says of a tensor that alone owns its memory (the temporary
# storage object made to ask counts too), measured rather than assumed.
_SOLE_USER = _storage_users(torch.empty(1))


def _handover(value: Any) -> Any:
    """``value`` ready to leave a worker that forgets it, copying only if it must.

    A freed tensor can be handed over as it is, unless its memory is still shared
    with something else on the worker (it is a view, or other objects view it).
    A non-leaf is detached so no autograd graph leaves the worker.
    """
    if isinstance(value, torch.Tensor):
        shared = value._base is not None or _storage_users(value) > _SOLE_USER
        if shared:
            return snapshot(value)
        if not value.is_leaf:
            out = value.detach()
            out.requires_grad_(True)
            return out
        return value
    return snapshot(value)


class Session:
    """One client's connection to a worker: its namespace and its reply path.

    ``aliases_values`` is true for transports that may hold on to what the
    worker replies with after ``deliver`` returns (objects passed by reference,
    or buffers written to a socket later): the worker then replies with copies,
    so the client never shares memory with the worker's store.

    ``memory_quota`` bounds the bytes of tensors this session may store (``None``:
    no bound).
    """

    __slots__ = (
        "_actor",
        "aliases_values",
        "closed",
        "deliver",
        "executed",
        "lost",
        "memory_quota",
        "memory_used",
        "objects",
        "submitted",
    )

    def __init__(
        self,
        actor: WorkerActor,
        deliver: Callable[[list[Message]], None],
        lost: Callable[[BaseException], None],
        aliases_values: bool,
        memory_quota: int | None = None,
    ) -> None:
        self._actor = actor
        self.deliver = deliver
        self.lost = lost
        self.aliases_values = aliases_values
        self.memory_quota = memory_quota
        self.memory_used = 0
        self.objects: dict[int, Any] = {}
        self.closed = False
        # Two counters, each written by one thread only (submitter, actor), so a
        # threaded actor needs no lock to know how many commands are queued.
        self.submitted = 0
        self.executed = 0

    @property
    def pending(self) -> int:
        """Commands submitted and not yet run."""
        return self.submitted - self.executed

    def submit(self, batch: Sequence[Message]) -> None:
        """Queue a batch of commands for the worker (never blocks)."""
        if self.closed:
            return
        self.submitted += len(batch)
        self._actor._post(self, batch)

    def close(self) -> None:
        """End the session: its objects are freed once queued batches ran."""
        if not self.closed:
            self.closed = True
            self._actor._post(self, None)


class WorkerActor:
    """The server side of a worker: store, mailbox and command loop.

    An in-process worker's mailbox is run by callbacks on the event loop it was
    made on (see the module's theory of operation). A worker that
    serves a network runs it on a thread of its own (``threaded=True``,
    :meth:`serve_in_thread`) so its event loop keeps answering pings, handshakes
    and other clients while a long operation computes.
    """

    def __init__(
        self,
        id: str,
        *,
        threaded: bool = False,
        datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.id = id
        self.closed = False
        self._sessions: set[Session] = set()
        # A threaded actor's mailbox, read by its thread (serve_in_thread)...
        self._mailbox: queue.SimpleQueue[_Letter] | None = queue.SimpleQueue() if threaded else None
        # ...and an in-process actor's, run on its loop: by the one callback that
        # _post schedules (_drain_scheduled) or by a caller that drains it.
        self._letters: collections.deque[_Letter] = collections.deque()
        self._drain_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        if not threaded:
            with contextlib.suppress(RuntimeError):  # made outside a loop: bound on first post
                self._loop = asyncio.get_running_loop()
        # Mail posted (by the submitting thread) and mail run (by the actor's
        # thread, holding _running): equal while the actor is idle.
        self._posted = 0
        self._finished = 0
        self._running = threading.Lock()
        #: Data sets this worker holds itself, by name: (examples, labels).
        self.datasets: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(datasets or {})
        # Operations of fedtensor's own (see _ops.WORKER_OPERATIONS), bound to this worker.
        self._worker_operations: dict[str, Callable[..., Any]] = {
            "fedtensor.dataset": self._dataset,
            "fedtensor.local_update": local_update,
        }
        assert set(self._worker_operations) == set(WORKER_OPERATIONS)

    def _dataset(self, name: str, part: str) -> Any:
        """A copy of one part (``"data"``, ``"targets"``, ``"size"``) of a held data set."""
        found = self.datasets.get(name) if isinstance(name, str) else None
        if found is None:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise LookupError(f"worker {self.id!r} holds no data set {name!r} (it holds: {known})")
        if part == "size":
            return len(found[0])
        if part not in ("data", "targets"):
            raise ValueError(f"a data set has parts 'data', 'targets' and 'size', not {part!r}")
        # A copy: one client's in-place operation must not change another's data.
        return (found[0] if part == "data" else found[1]).clone()

    # -- sessions ---------------------------------------------------------------------------------

    def open_session(
        self,
        deliver: Callable[[list[Message]], None],
        lost: Callable[[BaseException], None],
        *,
        aliases_values: bool,
        memory_quota: int | None = None,
    ) -> Session:
        """A new client namespace; ``deliver`` gets its replies, ``lost`` the worker's end."""
        if self.closed:
            raise WorkerUnavailable(f"worker {self.id!r} is closed")
        session = Session(self, deliver, lost, aliases_values, memory_quota)
        self._sessions.add(session)
        return session

    def close(self) -> None:
        """Stop serving: free every object and tell every session's client."""
        if self.closed:
            return
        self.closed = True
        if self._mailbox is not None:
            self._post(None, None)
        # Queued batches never run: dropping them frees the tensors they carry.
        self._letters.clear()
        error = WorkerUnavailable(f"worker {self.id!r} closed")
        sessions, self._sessions = self._sessions, set()
        for session in sessions:
            session.objects.clear()
            if not session.closed:
                session.closed = True
                session.lost(error)

    def iter_objects(self) -> Iterator[tuple[int, Any]]:
        """Every stored object of every session, as ``(id, object)``."""
        for session in self._sessions:
            yield from session.objects.items()

    def object_count(self) -> int:
        return sum(len(session.objects) for session in self._sessions)

    # -- the loop ---------------------------------------------------------------------------------

    def serve_in_thread(self) -> None:
        """Run batches from the mailbox until :meth:`close` (the body of a thread)."""
        mailbox = self._mailbox
        assert mailbox is not None, "an in-process actor's mailbox runs on its event loop"
        while not self.closed:
            session, batch = mailbox.get()
            with self._running:
                self._run(session, batch)
                self._finished += 1
            del session, batch

    def run_inline(self, session: Session, batch: Sequence[Message]) -> bool:
        """Run ``batch`` for ``session``: its cheap commands now, if the actor is idle.

        Called on the thread that submits (a threaded actor's event loop). The
        commands from the first one that is not cheap onwards, or all of them
        while the actor has anything queued or running, are submitted. Returns
        whether any were.
        """
        done = 0
        if not session.closed and self._running.acquire(blocking=False):
            try:
                if self._posted == self._finished and not self.closed:
                    done = self._run_cheap_prefix(session, batch)
            finally:
                self._running.release()
        if done < len(batch):
            session.submit(batch[done:] if done else batch)
            return True
        return False

    def _run_cheap_prefix(self, session: Session, batch: Sequence[Message]) -> int:
        objects = session.objects
        replies: list[Message] = []
        done = 0
        try:
            for message in batch[:INLINE_MAX_COMMANDS]:
                if not is_cheap(objects, message):
                    break
                replies += self.execute(session, (message,))
                done += 1
            if replies and not session.closed:
                self._deliver(session, replies)
        except Exception:
            _log.exception("worker %r failed on a batch from a client", self.id)
            return len(batch)  # as the actor's loop does: the batch is not retried
        return done

    def _post(
        self, session: Session | None, item: Sequence[Message] | Callable[[], None] | None
    ) -> None:
        self._posted += 1
        mailbox = self._mailbox
        if mailbox is not None:
            mailbox.put_nowait((session, item))
            return
        self._letters.append((session, item))
        if not self._drain_scheduled:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._drain_posted)
            self._drain_scheduled = True

    def _drain_posted(self) -> None:
        # The callback _post scheduled; a caller may have drained the mailbox since.
        self._drain_scheduled = False
        self.drain()

    def drain(self) -> None:
        """Run every batch already in an in-process actor's mailbox, now, in order.

        Lets an in-process caller observe the store as of everything it sent,
        without awaiting. Only call it from the actor's own event loop thread.
        """
        letters = self._letters
        try:
            while letters:
                session, batch = letters.popleft()
                self._run(session, batch)
        finally:
            # Should a barrier's callback raise, the letters after it still run.
            if letters and not self._drain_scheduled and self._loop is not None:
                self._loop.call_soon(self._drain_posted)
                self._drain_scheduled = True

    def barrier(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the actor's thread) once everything queued before has run."""
        self._post(None, callback)

    def _run(
        self, session: Session | None, batch: Sequence[Message] | Callable[[], None] | None
    ) -> None:
        if session is None:
            if callable(batch):
                batch()
            return
        assert not callable(batch)
        if batch is None:
            session.objects.clear()
            session.memory_used = 0
            self._sessions.discard(session)
            return
        session.executed += len(batch)
        try:
            replies = self.execute(session, batch)
            if replies and not session.closed:
                self._deliver(session, replies)
        except Exception:
            # A bug here must not stop the worker for every other client.
            _log.exception("worker %r failed on a batch from a client", self.id)

    @staticmethod
    def _deliver(session: Session, replies: list[Message]) -> None:
        try:
            session.deliver(replies)
        except ProtocolError:
            # A value that cannot be encoded fails its own fetch, not the whole batch.
            for reply in replies:
                try:
                    session.deliver([reply])
                except ProtocolError as exc:
                    session.deliver(
                        [Failure(reply.request, "remote", "ProtocolError", str(exc))]  # type: ignore[union-attr]
                    )

    # -- commands ---------------------------------------------------------------------------------

    def execute(self, session: Session, batch: Sequence[Message]) -> list[Message]:
        """Run a batch of commands for ``session``; return the replies it produced.

        The one dispatch of every command. A session with a memory quota is kept
        within it by an accounting hook (:func:`_within_quota`) told of every object
        stored, replaced, released or fetched away; without a quota (the in-memory
        hot path) the hook is ``None``, and a command pays one ``is None`` test for it.
        """
        objects = session.objects
        account = None if session.memory_quota is None else _within_quota
        replies: list[Message] = []
        for message in batch:
            kind = type(message)
            if kind is Call:
                if account is None:
                    objects[message.id] = self._call(objects, message)  # type: ignore[union-attr,arg-type]
                else:
                    value = self._call(objects, message)  # type: ignore[arg-type]
                    objects[message.id] = account(session, objects.get(message.id), value)  # type: ignore[union-attr]
            elif kind is Release:
                if account is None:
                    for id_ in message.ids:  # type: ignore[union-attr]
                        objects.pop(id_, None)
                else:
                    for id_ in message.ids:  # type: ignore[union-attr]
                        account(session, objects.pop(id_, None), None)
            elif kind is Store:
                if account is None:
                    objects[message.id] = message.value  # type: ignore[union-attr]
                else:
                    value = message.value  # type: ignore[union-attr]
                    objects[message.id] = account(session, objects.get(message.id), value)  # type: ignore[union-attr]
            elif kind is Fetch:
                if account is not None and message.free:  # type: ignore[union-attr]
                    account(session, objects.get(message.id), None)  # type: ignore[union-attr]
                replies.append(self._fetch(session, message))  # type: ignore[arg-type]
            elif kind is ListObjects:
                replies.append(Reply(message.request, sorted(objects)))  # type: ignore[union-attr]
            # Anything else (a reply sent to a worker) cannot be answered: it is dropped.
        return replies

    def _call(self, objects: dict[int, Any], message: Call) -> Any:
        func = OPERATIONS.get(message.op)
        if func is None:
            func = self._worker_operations.get(message.op)
            if func is None:
                return Failed(
                    "forbidden", "ForbiddenOperation", f"operation {message.op!r} is not allowed"
                )
        try:
            args = _resolve_args(objects, message.args)
            kwargs = _resolve_kwargs(objects, message.kwargs) if message.kwargs else {}
        except _Unresolved as exc:
            return exc.failed
        try:
            return func(*args, **kwargs)
        except ForbiddenOperation as exc:  # a plan naming an operation off the allow-list
            return Failed("forbidden", "ForbiddenOperation", exc.remote_message)
        except Exception as exc:  # the op's own error is the client's to see
            return Failed("remote", type(exc).__name__, str(exc))

    def _fetch(self, session: Session, message: Fetch) -> Message:
        objects = session.objects
        value = (
            objects.pop(message.id, _MISSING) if message.free else objects.get(message.id, _MISSING)
        )
        if value is _MISSING:
            return Failure(message.request, "not_found", "ObjectNotFound", _not_found(message.id))
        if type(value) is Failed:
            return Failure(message.request, value.kind, value.error_type, value.message)
        if isinstance(value, tuple) and type(value) is not tuple:
            value = tuple(value)  # torch.return_types.* and torch.Size travel as tuples
        if session.aliases_values:
            value = _handover(value) if message.free else snapshot(value)
        return Reply(message.request, value)


_MISSING: Any = object()


def _within_quota(session: Session, replaced: Any, value: Any) -> Any:
    """What to store in place of ``replaced``: ``value``, or a Failed marker if it would
    pass ``session``'s memory quota; ``session.memory_used`` counts the change.

    ``value`` None is a release (or a fetch that frees): only ``replaced`` is uncounted.
    """
    quota = session.memory_quota
    assert quota is not None
    session.memory_used -= tensor_bytes(replaced)
    size = tensor_bytes(value)
    if session.memory_used + size > quota:
        value = Failed(
            "limit",
            "MemoryQuotaExceeded",
            f"storing {size} bytes would pass the client's memory quota of "
            f"{quota} bytes ({session.memory_used} in use)",
        )
        size = 0
    session.memory_used += size
    return value


def _not_found(id_: int) -> str:
    return f"no object with id {id_} (never stored, already freed, or another client's)"


def _lookup(objects: Mapping[int, Any], id_: int) -> Any:
    value = objects.get(id_, _MISSING)
    if value is _MISSING:
        raise _Unresolved(Failed("not_found", "ObjectNotFound", _not_found(id_)))
    if type(value) is Failed:
        raise _Unresolved(value)
    return value


def _resolve(objects: Mapping[int, Any], value: Any) -> Any:
    kind = type(value)
    if kind is Ref:
        return _lookup(objects, value.id)
    if kind is list:
        return [_resolve(objects, item) for item in value]
    if kind is tuple:
        return tuple(_resolve(objects, item) for item in value)
    if kind is dict:
        return {key: _resolve(objects, item) for key, item in value.items()}
    return value


def _resolve_args(objects: Mapping[int, Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    # The common case, a few refs and scalars, without building generators.
    out = []
    for arg in args:
        kind = type(arg)
        if kind is Ref:
            out.append(_lookup(objects, arg.id))
        elif kind is list or kind is tuple or kind is dict:
            out.append(_resolve(objects, arg))
        else:
            out.append(arg)
    return tuple(out)


def _resolve_kwargs(objects: Mapping[int, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: _resolve(objects, value) for key, value in kwargs.items()}
