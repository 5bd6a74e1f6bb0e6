"""The worker actor: a mailbox, an object store per client, and the command loop.

Theory of operation
-------------------
A :class:`WorkerActor` owns its objects. Transports (in-memory, websocket) do
not touch the store: for every client that connects they open a
:class:`Session`, hand it batches of decoded commands with
:meth:`Session.submit`, and receive the replies through the ``deliver``
callback they passed in. Each session is a namespace: ids name objects of that
session only, so one client can neither read nor guess another's objects.

One client's batches are executed one at a time in the order they were posted,
so its commands run in the order they were sent and a pipelined chain is
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

A worker serving a network computes on threads of its own, so that its event
loop stays free for I/O while an operation computes, and so that one client's
long operation does not hold up another's: each client has a lane of its own,
and a bounded pool of threads runs the lanes round robin, a time slice at a
time, cutting long batches between commands
(:class:`~fedtensor.worker.scheduler.Scheduler`; every thread the server starts
runs :meth:`WorkerActor.serve_in_thread`). A lane may also carry a frame still
to decode (:meth:`WorkerActor.defer`): the server decodes large frames there,
not on its event loop. Handing a batch to a thread and its replies back costs
about 120 microseconds here, more than a small operation itself, so
:meth:`WorkerActor.run_inline` runs the commands that are provably cheap (see
:mod:`fedtensor.worker.inline`) on the caller's thread instead, when that
client's lane is idle: nothing of its queued, nothing running. The order of
commands is kept: the first command that is not cheap, and every command after
it, goes through the lane. Sessions share only the actor's data sets, which
operations read (``fedtensor.dataset`` hands out copies).

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
import threading
import time
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
from fedtensor.worker.autograd_ops import (
    autograd_grad,
    checked,
    element,
    no_grad_operation,
    set_attribute,
)
from fedtensor.worker.budget import (
    Ledger,
    Replies,
    SavedOverBudget,
    check_call,
    check_worker_operation,
    reply_bytes,
    requires_grad,
)
from fedtensor.worker.evaluate import evaluate
from fedtensor.worker.exchange import Exchange
from fedtensor.worker.failed import Failed
from fedtensor.worker.inline import MAX_COMMANDS as INLINE_MAX_COMMANDS
from fedtensor.worker.inline import is_cheap
from fedtensor.worker.local_update import local_update
from fedtensor.worker.local_updates import local_updates
from fedtensor.worker.plan_run import run_plan
from fedtensor.worker.scheduler import Scheduler
from fedtensor.worker.secagg import private_update
from fedtensor.worker.secagg import worker_operations as secagg_operations
from fedtensor.worker.sharing import beaver_triple, split_shares

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

# An in-process actor's letters: (session, batch) runs a batch; (session, None) ends a
# session; (None, callback) is a barrier.
_Letter: TypeAlias = "tuple[Session | None, Sequence[Message] | Callable[[], None] | None]"


class _Rest:
    """What is left of a batch whose lane's time slice ended (see the scheduler)."""

    __slots__ = ("batch", "counted", "start")

    def __init__(self, batch: Sequence[Message], start: int, counted: bool) -> None:
        self.batch = batch
        self.start = start
        #: Whether the batch's commands count in Session.submitted (a deferred frame's do not).
        self.counted = counted


#: Commands run between two looks at the clock grow up to this many while they are quick.
_MAX_STRIDE = 64


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

    ``memory_quota`` bounds the bytes of everything this session may store, and
    what one of its operations may allocate (``None``: no bound; see
    :mod:`fedtensor.worker.budget`). ``replies``, set by a transport that writes
    replies later, bounds the bytes of replies the client has not taken: past it,
    the session's commands are ``parked`` until the client has caught up.
    """

    __slots__ = (
        "_actor",
        "_park_lock",
        "aliases_values",
        "closed",
        "deliver",
        "executed",
        "ledger",
        "lost",
        "memory_quota",
        "memory_used",
        "metadata",
        "objects",
        "parked",
        "replies",
        "resuming",
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
        #: What this client's stored objects cost (fedtensor.worker.budget), with a quota.
        self.ledger = Ledger(memory_quota) if memory_quota is not None else None
        self.objects: dict[int, Any] = {}
        # Tags and description by object id (fedtensor.worker.catalog), kept beside objects.
        self.metadata: dict[int, tuple[frozenset[str], str | None]] = {}
        self.closed = False
        # Two counters, each written by one thread only (submitter, actor), so a
        # threaded actor needs no lock to know how many commands are queued.
        self.submitted = 0
        self.executed = 0
        #: Bytes of replies the client has not taken, and their bound (None: unbounded).
        self.replies: Replies | None = None
        #: Commands held back while the client does not take its replies (None: none).
        self.parked: list[Message] | None = None
        self.resuming = False
        self._park_lock = threading.Lock()

    def resume_if_drained(self) -> bool:
        """Run the parked commands again once the client took enough of its replies.

        Called on the submitting thread whenever replies were sent; returns whether
        the session is now not parked, or on its way to run its parked commands.
        """
        replies = self.replies
        with self._park_lock:
            if self.parked is None or self.resuming:
                return True
            if self.closed or (replies is not None and not replies.room_for_next()):
                return False
            self.resuming = True
        self._actor._post(self, _RESUME)
        return True

    def _unpark(self, batch: Sequence[Message]) -> Sequence[Message]:
        """On the actor's thread: what to run of ``batch`` now that the session is parked
        (nothing: it joins the parked commands) or resumed (the parked commands)."""
        with self._park_lock:
            parked = self.parked
            if batch is _RESUME:
                self.parked, self.resuming = None, False
                return parked or ()
            if parked is not None:
                parked.extend(batch)
                return ()
            return batch

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


#: fedtensor's worker operations whose results can carry an autograd graph the client keeps
#: (a plan run on tensors that require grad; ``torch.autograd.grad(create_graph=True)``):
#: run, as torch operations are, with the tensors their graph saves charged to the client.
#: (``fedtensor.local_update`` and the like finish their backward passes themselves.)
_GRAPH_MAKING_OPERATIONS = frozenset({"fedtensor.run_plan", "fedtensor.autograd_grad"})


class WorkerActor:
    """The server side of a worker: store, mailbox and command loop.

    An in-process worker's mailbox is run by callbacks on the event loop it was
    made on (see the module's theory of operation). A worker that
    serves a network runs its clients' lanes on threads of its own (``threaded=True``;
    each runs :meth:`serve_in_thread`) so its event loop keeps answering pings,
    handshakes and other clients while a long operation computes.
    """

    def __init__(
        self,
        id: str,
        *,
        threaded: bool = False,
        datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        step_delay: float = 0.0,
    ) -> None:
        self.id = id
        self.closed = False
        #: Seconds slept after every local training step: a simulated slow worker, for
        #: tests and benchmarks only (``fedtensor worker --step-delay``).
        self.step_delay = step_delay
        self._sessions: set[Session] = set()
        # A threaded actor's lanes, one per session, run by its threads (serve_in_thread)...
        self._scheduler: Scheduler | None = Scheduler(self._run_for) if threaded else None
        # ...and an in-process actor's mailbox, run on its loop: by the one callback that
        # _post schedules (_drain_scheduled) or by a caller that drains it.
        self._letters: collections.deque[_Letter] = collections.deque()
        self._drain_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        if not threaded:
            with contextlib.suppress(RuntimeError):  # made outside a loop: bound on first post
                self._loop = asyncio.get_running_loop()
        #: Data sets this worker holds itself, by name: (examples, labels).
        self.datasets: dict[str, tuple[torch.Tensor, torch.Tensor]] = dict(datasets or {})
        # Operations of fedtensor's own (see _ops.WORKER_OPERATIONS), bound to this worker.
        self._worker_operations: dict[str, Callable[..., Any]] = {
            "fedtensor.dataset": self._dataset,
            "fedtensor.local_update": self._local_update,
            "fedtensor.local_updates": self._local_updates,
            "fedtensor.evaluate": evaluate,
            "fedtensor.run_plan": run_plan,
            "fedtensor.beaver_triple": beaver_triple,
            "fedtensor.split_shares": split_shares,
            **secagg_operations(),
        }
        #: Tags, search and deliveries to other workers (fedtensor.worker.exchange).
        self.exchange = Exchange(id, self.datasets)
        self._worker_operations.update(self.exchange.operations())
        # PySyft-style training on pointers (fedtensor.worker.autograd_ops).
        self._worker_operations.update(
            {
                "fedtensor.autograd_grad": autograd_grad,
                "fedtensor.checked": checked,
                "fedtensor.element": element,
                "fedtensor.no_grad": no_grad_operation(self._worker_operations),
                "fedtensor.set_attribute": set_attribute,
            }
        )
        assert set(self._worker_operations) == set(WORKER_OPERATIONS)

    def _local_update(self, *args: Any, private: bool = False, **kwargs: Any) -> Any:
        """``fedtensor.local_update`` with this worker's ``step_delay`` (never the client's).

        ``private=True`` (secure aggregation): the result is kept on the worker as a
        :class:`~fedtensor.worker.secagg.PrivateUpdate`, which no fetch can read.
        """
        if "step_delay" in kwargs:
            raise TypeError("step_delay is the worker's setting, not a client's")
        update = local_update(*args, **kwargs, step_delay=self.step_delay)
        return private_update(update) if private is True else update

    def _local_updates(self, *args: Any, **kwargs: Any) -> Any:
        """``fedtensor.local_updates`` (simulated clients), with this worker's ``step_delay``."""
        if "step_delay" in kwargs:
            raise TypeError("step_delay is the worker's setting, not a client's")
        return local_updates(*args, **kwargs, step_delay=self.step_delay)

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
        if self._scheduler is not None:
            self._scheduler.close()
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
        """Run clients' lanes until :meth:`close` (the body of each compute thread)."""
        scheduler = self._scheduler
        assert scheduler is not None, "an in-process actor's mailbox runs on its event loop"
        scheduler.serve()

    def run_inline(self, session: Session, batch: Sequence[Message]) -> bool:
        """Run ``batch`` for ``session``: its cheap commands now, if the actor is idle.

        Called on the thread that submits (a threaded actor's event loop). The
        commands from the first one that is not cheap onwards, or all of them
        while the actor has anything queued or running, are submitted. Returns
        whether any were.
        """
        done = 0
        scheduler = self._scheduler
        # Only this thread posts, so an idle lane stays idle while the prefix runs.
        idle = scheduler.idle(session) if scheduler is not None else not self._letters
        if idle and not session.closed and not self.closed:
            done = self._run_cheap_prefix(session, batch)
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
        scheduler = self._scheduler
        if scheduler is not None:
            if session is None:
                assert callable(item)
                scheduler.barrier(item)
            else:
                scheduler.post(session, item)
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

    def barrier(self, callback: Callable[[], None], session: Session | None = None) -> None:
        """Call ``callback`` (on the actor's thread) once everything queued before has run
        (for ``session`` only, on a threaded actor, if given)."""
        if session is not None and self._scheduler is not None:
            self._scheduler.barrier(callback, session)
        else:
            self._post(None, callback)

    def defer(self, session: Session, produce: Callable[[], Sequence[Message] | None]) -> None:
        """Queue ``produce`` on a threaded actor's lane for ``session``: it runs there,
        in order with the session's batches, and the commands it returns run then
        (they are not counted in :attr:`Session.pending`). The server decodes large
        frames this way, off its event loop."""
        assert self._scheduler is not None, "only a threaded actor defers"
        if not session.closed:
            self._scheduler.post(session, produce)

    def _run_for(self, session: Session, item: Any, deadline: float) -> _Rest | None:
        """Run one item of ``session``'s lane until ``deadline`` (between two commands);
        return what is left of it (the scheduler's ``run``)."""
        if item is None:
            self._run(session, None)  # the end of the session
            return None
        if type(item) is _Rest:
            rest = item
        elif callable(item):
            try:
                batch = item()
            except Exception:
                _log.exception("worker %r failed to prepare a batch from a client", self.id)
                return None
            if not batch:
                return None
            rest = _Rest(batch, 0, counted=False)
        else:
            rest = _Rest(item, 0, counted=True)
        batch, start = rest.batch, rest.start
        end = len(batch)
        done = start
        stride = 1
        replies: list[Message] = []
        try:
            if not end:  # an empty batch may mean something to execute (a resumption)
                replies = self.execute(session, batch)
            # A look at the clock every `stride` commands: one while they take long
            # (a slice never outlasts one command past its deadline), more while quick.
            while done < end:
                began = time.perf_counter()
                upto = min(done + stride, end)
                replies += self.execute(session, batch[done:upto])
                if rest.counted:
                    session.executed += upto - done
                done = upto
                now = time.perf_counter()
                if now >= deadline:
                    break
                if now - began < 0.0005 and stride < _MAX_STRIDE:
                    stride *= 2
                elif now - began >= 0.0005:
                    stride = 1
            if replies and not session.closed:
                self._deliver(session, replies)
        except Exception:
            # A bug here must not stop the worker for every other client.
            _log.exception("worker %r failed on a batch from a client", self.id)
            if rest.counted:
                session.executed += end - done
            done = end
        if done < end:
            rest.start = done
            return rest
        return None

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
            session.metadata.clear()  # a compute thread may keep the session object a while
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
        within it by its :class:`~fedtensor.worker.budget.Ledger`, told of every object
        stored, replaced, released or fetched away, and asked before an operation
        runs (:func:`~fedtensor.worker.budget.check_call`); without a quota (the
        in-memory hot path) the ledger is ``None``, and a command pays one ``is None``
        test for it.
        """
        if not torch.is_grad_enabled():
            # An in-process worker runs on its client's thread, maybe inside the client's
            # torch.no_grad(): commands carry their own grad mode (fedtensor.no_grad).
            with torch.enable_grad():
                return self.execute(session, batch)
        objects = session.objects
        self.exchange.session = session  # what fedtensor.search and friends read
        if session.parked is not None or batch is _RESUME:
            batch = session._unpark(batch)
        ledger = session.ledger
        gate = session.replies
        replies: list[Message] = []
        for position, message in enumerate(batch):
            kind = type(message)
            if kind is Call:
                if ledger is None:
                    objects[message.id] = self._call(objects, message)  # type: ignore[union-attr,arg-type]
                else:
                    value = self._call(objects, message, ledger)  # type: ignore[arg-type]
                    objects[message.id] = ledger.store(message.id, value)  # type: ignore[union-attr]
                    session.memory_used = ledger.used
            elif kind is Release:
                if ledger is None:
                    for id_ in message.ids:  # type: ignore[union-attr]
                        objects.pop(id_, None)
                else:
                    for id_ in message.ids:  # type: ignore[union-attr]
                        objects.pop(id_, None)
                        ledger.release(id_)
                    session.memory_used = ledger.used
            elif kind is Store:
                if ledger is None:
                    objects[message.id] = message.value  # type: ignore[union-attr]
                else:
                    value = message.value  # type: ignore[union-attr]
                    objects[message.id] = ledger.store(message.id, value)  # type: ignore[union-attr]
                    session.memory_used = ledger.used
            elif kind is Fetch:
                if gate is not None:
                    size = reply_bytes(objects.get(message.id))  # type: ignore[union-attr]
                    with session._park_lock:
                        held = gate.held()
                        if held and held + size > gate.bound:
                            # The client is not taking its replies: hold this and
                            # everything after it until it has (resume_if_drained).
                            session.parked = list(batch[position:])
                            gate.needed = size
                    if session.parked is not None:
                        gate.parked()
                        break
                    gate.admit(message.request, size)  # type: ignore[union-attr]
                if ledger is not None and message.free:  # type: ignore[union-attr]
                    ledger.release(message.id)  # type: ignore[union-attr]
                    session.memory_used = ledger.used
                replies.append(self._fetch(session, message))  # type: ignore[arg-type]
                if ledger is not None and message.free:  # type: ignore[union-attr]
                    ledger.settle()  # the graph of what was fetched away is gone now
                    session.memory_used = ledger.used
            elif kind is ListObjects:
                replies.append(Reply(message.request, sorted(objects)))  # type: ignore[union-attr]
            # Anything else (a reply sent to a worker) cannot be answered: it is dropped.
        return replies

    def _call(self, objects: dict[int, Any], message: Call, ledger: Ledger | None = None) -> Any:
        func = OPERATIONS.get(message.op)
        worker_operation = func is None
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
        if ledger is not None:
            # Refused before it allocates: what it would make must fit the budget.
            inner = args[0] if message.op == "fedtensor.no_grad" and args else None
            try:
                if type(inner) is str and inner in OPERATIONS:
                    # A torch operation under the client's no_grad is checked as itself.
                    refused = check_call(inner, OPERATIONS[inner], args[1:], kwargs, ledger)
                elif worker_operation:
                    refused = check_worker_operation(
                        message.op,
                        args,
                        kwargs,
                        ledger,
                        self.datasets,
                        getattr(self.exchange.session, "metadata", None),  # for search
                        objects,
                    )
                else:
                    refused = check_call(message.op, func, args, kwargs, ledger)
            except Exception as exc:  # a check that fails fails its command, not the batch
                return Failed("limit", type(exc).__name__, f"{message.op}: {exc}")
            if refused is not None:
                return refused
        try:
            if (
                ledger is not None
                and (not worker_operation or message.op in _GRAPH_MAKING_OPERATIONS)
                and requires_grad(args, kwargs)
            ):
                # Tensors its graph saves for backward are charged while the graph holds them.
                with ledger.saved_tensors():
                    return func(*args, **kwargs)
            return func(*args, **kwargs)
        except SavedOverBudget as exc:
            return exc.failed
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


class _Resume(tuple):  # type: ignore[type-arg]
    """An empty batch unlike any other (``()`` is a singleton): see _RESUME."""

    __slots__ = ()


#: The letter that runs a session's parked commands (see Session.resume_if_drained).
_RESUME: Sequence[Message] = _Resume()


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
