"""The worker actor: a mailbox, an object store per client, and the command loop.

Theory of operation
-------------------
A :class:`WorkerActor` owns its objects. Transports (in-memory, websocket) do
not touch the store: for every client that connects they open a
:class:`Session`, hand it batches of decoded commands with
:meth:`Session.submit`, and receive the replies through the ``deliver``
callback they passed in. Each session is a namespace: ids name objects of that
session only, so one client can neither read nor guess another's objects.

All batches go through one FIFO mailbox and are executed one at a time by
:meth:`WorkerActor.serve`, so the commands of one client run in the order they
were sent and a pipelined chain is correct without waiting. Executing a batch
(:meth:`WorkerActor.execute`) is plain synchronous code with no I/O: it is what
the unit tests drive directly.

A worker serving a network runs its mailbox on a thread of its own, so that
its event loop stays free for I/O while an operation computes. Handing a batch
to that thread and its replies back costs about 120 microseconds here, more
than a small operation itself, so :meth:`WorkerActor.run_inline` runs the
commands that are provably cheap (see :func:`_is_cheap`) on the caller's
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
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import anyio
import anyio.abc
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
from fedtensor.worker.local_update import local_update

__all__ = ["Failed", "Session", "WorkerActor", "in_process_workers", "snapshot", "tensor_bytes"]

# Workers running in this process, by id: what ``memory://ID`` URLs name.
_in_process: dict[str, WorkerActor] = {}


def in_process_workers() -> dict[str, WorkerActor]:
    """The registry of in-process workers by id (the in-memory transport reads it)."""
    return _in_process


class Failed:
    """The stored outcome of a command that failed (or read a failed object)."""

    __slots__ = ("error_type", "kind", "message")

    def __init__(self, kind: str, error_type: str, message: str) -> None:
        self.kind = kind
        self.error_type = error_type
        self.message = message

    def __repr__(self) -> str:
        return f"<Failed {self.error_type}: {self.message}>"


class _Unresolved(Exception):
    """Raised while resolving arguments that name a failed or unknown object."""

    def __init__(self, failed: Failed) -> None:
        self.failed = failed


_log = logging.getLogger("fedtensor.worker")

# (session, batch) runs a batch; (session, None) ends a session; (None, callback) is a
# barrier; (None, None) wakes the loop so it sees it is closed.
_Letter: TypeAlias = "tuple[Session | None, Sequence[Message] | Callable[[], None] | None]"
_Mailbox: TypeAlias = "asyncio.Queue[_Letter] | queue.SimpleQueue[_Letter]"


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

    In-process workers run their loop as a task (:meth:`serve`). A worker that
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
        self._mailbox: _Mailbox = queue.SimpleQueue() if threaded else asyncio.Queue()
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
        self._post(None, None)
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

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run batches from the mailbox, one at a time, until cancelled."""
        mailbox = self._mailbox
        assert isinstance(mailbox, asyncio.Queue), "a threaded actor runs serve_in_thread()"
        task_status.started()
        while not self.closed:
            session, batch = await mailbox.get()
            self._run(session, batch)
            del session, batch  # an idle worker must not keep the last batch's tensors alive

    def serve_in_thread(self) -> None:
        """Run batches from the mailbox until :meth:`close` (the body of a thread)."""
        mailbox = self._mailbox
        assert isinstance(mailbox, queue.SimpleQueue)
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
            for message in batch[:_INLINE_MAX_COMMANDS]:
                if not _is_cheap(objects, message):
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
        self._mailbox.put_nowait((session, item))

    def drain(self) -> None:
        """Run every batch already in the mailbox, now, in order.

        Lets an in-process caller observe the store as of everything it sent,
        without awaiting. Only call it from the actor's own event loop thread.
        """
        mailbox = self._mailbox
        while not mailbox.empty():
            session, batch = mailbox.get_nowait()
            self._run(session, batch)

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
        """Run a batch of commands for ``session``; return the replies it produced."""
        if session.memory_quota is not None:
            return self._execute_with_quota(session, batch)
        objects = session.objects
        replies: list[Message] = []
        for message in batch:
            kind = type(message)
            if kind is Call:
                objects[message.id] = self._call(objects, message)  # type: ignore[union-attr,arg-type]
            elif kind is Release:
                for id_ in message.ids:  # type: ignore[union-attr]
                    objects.pop(id_, None)
            elif kind is Store:
                objects[message.id] = message.value  # type: ignore[union-attr]
            elif kind is Fetch:
                replies.append(self._fetch(session, message))  # type: ignore[arg-type]
            elif kind is ListObjects:
                replies.append(Reply(message.request, sorted(objects)))  # type: ignore[union-attr]
            # Anything else (a reply sent to a worker) cannot be answered: it is dropped.
        return replies

    def _execute_with_quota(self, session: Session, batch: Sequence[Message]) -> list[Message]:
        """:meth:`execute`, keeping the bytes of stored tensors within the session's quota."""
        objects = session.objects
        quota = session.memory_quota
        assert quota is not None
        replies: list[Message] = []
        for message in batch:
            kind = type(message)
            if kind is Call or kind is Store:
                id_ = message.id  # type: ignore[union-attr]
                session.memory_used -= tensor_bytes(objects.pop(id_, None))
                value = (
                    self._call(objects, message)  # type: ignore[arg-type]
                    if kind is Call
                    else message.value  # type: ignore[union-attr]
                )
                size = tensor_bytes(value)
                if session.memory_used + size > quota:
                    value = Failed(
                        "limit",
                        "MemoryQuotaExceeded",
                        f"storing {size} bytes would pass the client's memory quota of "
                        f"{quota} bytes ({session.memory_used} in use)",
                    )
                    size = 0
                objects[id_] = value
                session.memory_used += size
            elif kind is Release:
                for id_ in message.ids:  # type: ignore[union-attr]
                    session.memory_used -= tensor_bytes(objects.pop(id_, None))
            elif kind is Fetch:
                if message.free:  # type: ignore[union-attr]
                    session.memory_used -= tensor_bytes(objects.get(message.id))  # type: ignore[union-attr]
                replies.append(self._fetch(session, message))  # type: ignore[arg-type]
            elif kind is ListObjects:
                replies.append(Reply(message.request, sorted(objects)))  # type: ignore[union-attr]
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

# -- what runs inline -----------------------------------------------------------------------------

#: Operations whose cost grows with the size of their tensor inputs and no
#: other argument: elementwise arithmetic and math, comparisons, reductions,
#: views, indexing, and products (matmul's work is at most the product of
#: its inputs' sizes). Never: operations whose integer arguments set the size
#: of the result (``repeat``, ``expand``, ``unfold``), autograd, plans.
_INLINE_NAMES = frozenset(
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
_INLINE_OPERATIONS = frozenset(
    name for name in OPERATIONS if name.rpartition(".")[2] in _INLINE_NAMES
)
#: A cheap call's tensor inputs hold at most this many elements, multiplied
#: together (which bounds a broadcast result and a matrix product's work): a
#: few tens of microseconds at most.
_INLINE_MAX_ELEMENTS = 1 << 16
#: A cheap fetch replies with at most this many bytes of tensors.
_INLINE_MAX_FETCH_BYTES = 1 << 16
#: Commands run inline per frame, at most: a long pipelined burst goes to the actor.
_INLINE_MAX_COMMANDS = 64


def _is_cheap(objects: Mapping[int, Any], message: Message) -> bool:
    """Whether ``message`` surely runs in microseconds, given the store ``objects``."""
    kind = type(message)
    if kind is Call:
        if message.op not in _INLINE_OPERATIONS:  # type: ignore[union-attr]
            return False
        work = 1
        for arg in (*message.args, *message.kwargs.values()):  # type: ignore[union-attr]
            for item in arg if type(arg) is tuple or type(arg) is list else (arg,):
                value = objects.get(item) if type(item) is Ref else item
                if isinstance(value, torch.Tensor):
                    work *= max(value.numel(), 1)
                elif type(value) is tuple or type(value) is list:
                    return False  # nested deeper than cost accounting looks
        return work <= _INLINE_MAX_ELEMENTS
    if kind is Store or kind is Release:
        return True
    if kind is Fetch:
        value = objects.get(message.id)  # type: ignore[union-attr]
        if isinstance(value, torch.Tensor):
            # A grad travels too: only a leaf's (or a retained one) is read, as snapshot does.
            has_grad = (value.is_leaf or value.retains_grad) and value.grad is not None
            return value.nbytes <= _INLINE_MAX_FETCH_BYTES and not has_grad
        return value is None or type(value) in (int, float, bool, Failed)
    return False


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
