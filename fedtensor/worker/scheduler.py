"""Fair service between a worker's clients: a lane per client, run round robin by a
bounded pool of compute threads.

Theory of operation
-------------------
A worker serving a network computes off its event loop. With one compute thread
and one mailbox, a client's 3 s chain of matrix products held up every other
client's 7-float round trip for those 3 s. A :class:`Scheduler` instead keeps one
*lane* per client (a FIFO of what that client posted: batches of commands, frames
to decode, the end of its session) and a *ready line* of lanes that have work,
served by a few threads (:meth:`Scheduler.serve` is each one's body):

- A thread takes the lane at the head of the ready line and runs its items, in
  order, for one *time slice* (:data:`TIME_SLICE`); a lane with work left then
  goes to the back of the line. So one client's commands always run in the order
  sent, one at a time (a lane is on one thread at most), while different
  clients' lanes run on different threads at once, and a client with a long
  chain shares a thread with the others slice by slice when there are more busy
  clients than threads. An operation is never cut: a slice ends between
  commands (the ``run`` callback decides where, given the slice's deadline).
- A lane exists only while it has work: posting to a client with none puts its
  new lane on the ready line; the thread that runs its last item removes it.
  :meth:`Scheduler.idle` (no lane) is what lets the event loop run a client's
  cheap commands inline (see :mod:`fedtensor.worker.inline`): nothing of that
  client is queued or running, and only the loop posts.
- :meth:`Scheduler.barrier` calls back once everything posted before it has run
  (one lane's, or every lane's): a marker is appended to each lane concerned and
  the callback runs when the last marker is reached; a lane whose last item is
  the marker is removed *before* the callback runs, so a callback sees it idle.

How many threads: :func:`default_compute_threads`, at least two, so that a long
operation (even a single one: a slice never interrupts one) never holds up a
client whose lane is on another thread. Each thread's operations use torch's
intra-op threads as well; the worker CLI divides the cores between them
(``--threads``, ``--compute-threads``) so that N threads do not oversubscribe.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["TIME_SLICE", "Scheduler", "default_compute_threads"]

_log = logging.getLogger("fedtensor.worker")

#: Seconds a lane runs before the next ready lane gets the thread (between commands).
TIME_SLICE = 0.01


def default_compute_threads() -> int:
    """Compute threads for a worker: one per core, at least 2 and at most 4."""
    return max(2, min(4, os.cpu_count() or 1))


class _Countdown:
    """A barrier's markers: ``callback`` runs when the last lane reaches its marker."""

    __slots__ = ("_callback", "_left", "_lock")

    def __init__(self, lanes: int, callback: Callable[[], None]) -> None:
        self._left = lanes
        self._callback = callback
        self._lock = threading.Lock()

    def arrive(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            try:
                self._callback()
            except Exception:
                _log.exception("a barrier's callback failed")


_STOP: Any = object()


class Scheduler:
    """Lanes of work per key, run round robin by the threads that call :meth:`serve`.

    ``run(key, item, deadline)`` runs ``item`` of ``key``'s lane, stopping between
    two of its steps once ``time.perf_counter()`` passes ``deadline``; it returns
    what is left of the item (it runs first when the lane's turn comes again), or
    ``None`` when the item is done. It must not raise.
    """

    def __init__(
        self, run: Callable[[Any, Any, float], Any], *, time_slice: float = TIME_SLICE
    ) -> None:
        self._run = run
        self.time_slice = time_slice
        self._lanes: dict[Hashable, collections.deque[Any]] = {}
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.closed = False

    def post(self, key: Hashable, item: Any) -> None:
        """Append ``item`` to ``key``'s lane (any thread; never blocks)."""
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                self._lanes[key] = collections.deque((item,))
                self._ready.put(key)
            else:
                lane.append(item)

    def idle(self, key: Hashable) -> bool:
        """Whether ``key`` has nothing queued or running."""
        return key not in self._lanes

    def busy_lanes(self) -> int:
        return len(self._lanes)

    def barrier(self, callback: Callable[[], None], key: Hashable | None = None) -> None:
        """Call ``callback`` (on a compute thread) once everything posted before has
        run: to ``key``'s lane, or to every lane (``key`` None)."""
        with self._lock:
            if key is None:
                lanes = list(self._lanes.values())
            else:
                lane = self._lanes.get(key)
                lanes = [] if lane is None else [lane]
            if not lanes:
                self._ready.put(_Countdown(1, callback))
                return
            countdown = _Countdown(len(lanes), callback)
            for lane in lanes:
                lane.append(countdown)

    def close(self) -> None:
        """Stop: threads return after the item they are running; queued items never run."""
        with self._lock:
            self.closed = True
            self._lanes.clear()  # frees what the queued batches hold
        self._ready.put(_STOP)

    # -- the threads ------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run lanes until :meth:`close` (the body of each compute thread)."""
        ready = self._ready
        while True:
            key = ready.get()
            if key is _STOP or self.closed:
                ready.put(_STOP)  # for the other threads
                return
            if type(key) is _Countdown:  # a barrier with no lane to wait for
                key.arrive()
                continue
            self._run_lane(key)
            del key

    def _run_lane(self, key: Hashable) -> None:
        lanes, lock = self._lanes, self._lock
        with lock:
            lane = lanes.get(key)
        if lane is None:  # closed meanwhile
            return
        deadline = time.perf_counter() + self.time_slice
        while True:
            with lock:
                if not lane:
                    lanes.pop(key, None)
                    return
                item = lane[0]
                if type(item) is _Countdown:
                    lane.popleft()
                    last = not lane
                    if last:
                        lanes.pop(key, None)  # idle before the callback runs
            if type(item) is _Countdown:
                item.arrive()
                if last:
                    return
                continue
            try:
                rest = self._run(key, item, deadline)
            except Exception:  # a bug: the item is dropped, the thread serves on
                _log.exception("a client's command could not be run")
                rest = None
            del item
            with lock:
                if self.closed:
                    return
                if rest is None:
                    lane.popleft()
                else:
                    lane[0] = rest
                del rest
                if not lane:
                    lanes.pop(key, None)
                    return
                if time.perf_counter() >= deadline:
                    self._ready.put(key)  # to the back of the line
                    return
