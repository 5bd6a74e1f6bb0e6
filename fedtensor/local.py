"""Every core of this machine: :func:`local_workers` starts worker processes and stops them.

::

    async with ft.local_workers(4) as workers:        # 4 `fedtensor worker` processes
        data = ft.federate((images, labels), workers, split="iid", seed=0)
        history = await ft.fit(model, data, rounds=10)

Theory of operation
-------------------
Virtual workers train one after another on the caller's thread; worker processes
train in parallel, one per core (or per share of cores). :func:`local_workers`
is the one line that gets them: it starts ``n`` ``fedtensor worker`` processes,
each on ``127.0.0.1`` port 0 (the kernel picks a free port and the worker prints
the one it got in its ready line: no race between choosing a port and binding
it), with one fresh random token shared through the environment (never the
command line), and ``--threads`` set so that the processes share the cores out
(``threads=None``: the cores this process may run on, divided as evenly as they
go, at least one each), and ``--warm-up``: each worker pays the imports of its first
training's memory check (torch's compiler stack, seconds) before it is ready, not in
the first round. It waits for every ready line concurrently (a bounded
wait; a worker that exits first is reported with its standard error), then
connects a :class:`~fedtensor.RemoteWorker` to each: the handles are ordinary
worker handles (pointers, ``ft.federate``, ``ft.fit``, multi-pointers mixing
them with virtual workers).

Cores. ``pin=True`` gives each worker CPUs of its own (``--cpus``: the affinity of
every thread it has and starts), so that the kernel cannot put two busy workers on
one core while another idles. Every worker runs under ``SCHED_BATCH``
(``--batch-scheduling``, where the OS has it): the same share of the CPU, but a worker
that wakes does not preempt the thread running on its core, which on a machine shared
with the client is often the client, about to send the next worker its frame.

Stopping. Leaving the block, normally, by an exception, by cancellation or by
Ctrl-C (which reaches the parent only: the workers run in a session of their
own, so that the parent decides the order), closes the connections and sends
each worker SIGTERM (it finishes what it received, then exits), then SIGKILL to
any still running after ``stop_timeout``. The clean-up is shielded from the
cancellation that may be ending the block.

No orphans, even when the parent is SIGKILLed. A killed parent runs no clean-up
code, so each worker watches a pipe instead: its standard input is the read end
of a pipe whose only write end this process holds (``close_fds`` keeps it out of
every other child, siblings included), and the worker runs with
``--stop-on-stdin-eof``: a thread of its own blocks reading it, and when it ends
(the kernel closes a dead process's files, however it died) the worker shuts
down, exiting outright after a few seconds' grace. This is portable POSIX and,
unlike Linux's ``PR_SET_PDEATHSIG``, is not tied to the thread that started the
child (``fedtensor.sync`` starts workers from its runtime thread; ``anyio`` may
from a pool thread that later exits).
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any, Self

import anyio
import anyio.abc
import anyio.to_thread

from fedtensor.client.handles import DEFAULT_TIMEOUT, RemoteWorker, WorkerGroup, require_asyncio
from fedtensor.errors import FedTensorError, TimeoutError, WorkerUnavailable

__all__ = [
    "START_TIMEOUT",
    "LocalWorkers",
    "available_cores",
    "local_workers",
    "pin_cores",
    "share_cores",
]

#: Seconds a worker process may take to be ready (it imports torch; a loaded machine is slow).
START_TIMEOUT = 120.0

#: Whether this OS has batch scheduling (Linux), for ``--batch-scheduling``.
_HAS_BATCH = hasattr(os, "SCHED_BATCH") and hasattr(os, "sched_setscheduler")

#: Options local_workers sets itself: a caller's value would break the set-up.
_RESERVED = frozenset(
    {"id", "host", "port", "token_env", "token_file", "no_auth", "stop_on_stdin_eof", "threads"}
)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share_cores(workers: int, cores: int | None = None) -> list[int]:
    """Torch threads for each of ``workers`` processes sharing ``cores`` out (at least 1 each)."""
    cores = available_cores() if cores is None else cores
    base, extra = divmod(cores, workers)
    return [max(1, base + (1 if index < extra else 0)) for index in range(workers)]


def pin_cores(threads: Sequence[int], cores: Sequence[int] | None = None) -> list[list[int]]:
    """The CPUs of each worker when each gets ``threads[i]`` of ``cores`` (default: those
    this process may run on) of its own: consecutive runs, wrapping around when the
    workers want more than there are (4 workers of 1 thread on 2 cores: 0, 1, 0, 1)."""
    if cores is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        raise ValueError("pinning needs CPU affinity (os.sched_setaffinity: Linux)")
    pinned: list[list[int]] = []
    start = 0
    for count in threads:
        pinned.append(sorted({cores[(start + k) % len(cores)] for k in range(count)}))
        start += count
    return pinned


def _option_arguments(options: Mapping[str, Any], index: int, count: int) -> list[str]:
    """``fedtensor worker`` arguments for one worker from keyword options.

    ``memory_quota="1G"`` gives ``--memory-quota 1G``; ``True`` a bare flag; a mapping
    gives ``--NAME KEY=VALUE`` per item (``datasets={"digits": path}`` gives
    ``--dataset digits=PATH``); a list or tuple holds one value per worker.
    """
    arguments: list[str] = []
    for key, value in options.items():
        if key in _RESERVED:
            raise ValueError(f"local_workers sets {key!r} itself")
        if isinstance(value, list | tuple):
            if len(value) != count:
                raise ValueError(f"{key}: {len(value)} values for {count} workers")
            value = value[index]
        flag = "--" + ("dataset" if key == "datasets" else key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            arguments.append(flag)
        elif isinstance(value, Mapping):
            for name, item in value.items():
                arguments += [flag, f"{name}={os.fspath(item)}"]
        else:
            arguments += [flag, str(value)]
    return arguments


class LocalWorkers(WorkerGroup[RemoteWorker]):
    """``n`` worker processes on this machine and a connected handle to each.

    A sequence of :class:`~fedtensor.RemoteWorker` handles (``workers[0]``,
    ``len(workers)``, iteration), usable wherever a list of handles is. Open it with
    ``async with`` (or ``await group.start()`` then ``await group.aclose()``).
    """

    def __init__(
        self,
        n: int,
        *,
        threads: int | Sequence[int] | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = 10.0,
        timeout: float = DEFAULT_TIMEOUT,
        name: str = "local",
        log_level: str = "WARNING",
        warm_up: bool = True,
        pin: bool = False,
        batch_scheduling: bool = True,
        **worker_options: Any,
    ) -> None:
        if n < 1:
            raise ValueError("local_workers needs n >= 1")
        if pin and "cpus" in worker_options:
            raise ValueError("give pin=True or cpus=..., not both")
        if threads is None:
            per_worker = share_cores(n)
        elif isinstance(threads, int):
            per_worker = [threads] * n
        else:
            per_worker = list(threads)
        if len(per_worker) != n or min(per_worker) < 1:
            raise ValueError(f"threads: {n} values of at least 1 needed, not {threads!r}")
        self.threads = per_worker
        #: Each worker's CPUs when pinned (``pin=True``), else None.
        self.cpus = pin_cores(per_worker) if pin else None
        if self.cpus is not None:
            worker_options["cpus"] = [",".join(map(str, cpus)) for cpus in self.cpus]
        self.ids = [f"{name}-{index}" for index in range(n)]
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.timeout = timeout
        self._arguments = [
            [
                "--log-level",
                log_level,
                *_option_arguments(worker_options, index, n),
                *(["--warm-up"] if warm_up else []),
                *(["--batch-scheduling"] if batch_scheduling and _HAS_BATCH else []),
            ]
            for index in range(n)
        ]
        self._token = secrets.token_urlsafe(32)
        # The workers of one group form a federation: they can move tensors to each other
        # (ptr.move, secret sharing's triples). An inherited key joins a wider federation.
        self._federation_key = os.environ.get("FEDTENSOR_FEDERATION_KEY") or secrets.token_urlsafe(
            32
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._handles: list[RemoteWorker] = []
        self.urls: list[str] = []
        # Set by fedtensor.sync: the handles' pointers block instead of awaiting.
        self._blocking = False
        self._closed = False

    # -- the sequence of handles -----------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids."""
        return [process.pid for process in self.processes]

    def log(self, index: int) -> str:
        """What worker ``index`` has written to its standard error so far."""
        log = self._logs[index]
        if log.closed:
            return ""
        log.flush()
        return os.pread(log.fileno(), 1 << 20, 0).decode(errors="replace")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._handles)} open"
        return f"<LocalWorkers {', '.join(self.ids)} ({state})>"

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> Self:
        """Start the processes, wait until each is ready, connect to each; returns ``self``."""
        require_asyncio("ft.local_workers")
        if self.processes or self._closed:
            raise FedTensorError("these local workers were started already")
        failures: list[BaseException] = []
        try:
            self._spawn()
            urls: list[str] = [""] * len(self.processes)
            async with anyio.create_task_group() as group:
                for index in range(len(self.processes)):
                    group.start_soon(self._wait_ready, index, urls, failures, group)
            if not failures:
                self.urls = urls
                self._handles = [RemoteWorker(url, timeout=self.timeout) for url in urls]
                async with anyio.create_task_group() as group:
                    for handle in self._handles:
                        handle._blocking = self._blocking
                        group.start_soon(self._connect, handle, failures, group)
        except BaseException:
            await self.aclose()
            raise
        if failures:
            await self.aclose()
            raise failures[0]
        return self

    def _spawn(self) -> None:
        environment = {
            **os.environ,
            "FEDTENSOR_TOKEN": self._token,
            "FEDTENSOR_FEDERATION_KEY": self._federation_key,
        }
        for index, id_ in enumerate(self.ids):
            command = [sys.executable, "-m", "fedtensor", "worker", "--id", id_]
            command += ["--host", "127.0.0.1", "--port", "0", "--stop-on-stdin-eof"]
            command += ["--threads", str(self.threads[index]), *self._arguments[index]]
            # A file, not a pipe: nobody reads standard error while the worker runs,
            # and a full pipe would stall it.
            log = tempfile.TemporaryFile(prefix=f"fedtensor-{id_}-")  # noqa: SIM115
            self._logs.append(log)
            self.processes.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,  # the pipe the worker watches (module docstring)
                    stdout=subprocess.PIPE,  # the ready line
                    stderr=log,
                    env=environment,
                    close_fds=True,
                    start_new_session=True,  # Ctrl-C reaches the parent, which stops them
                )
            )

    async def _wait_ready(
        self,
        index: int,
        urls: list[str],
        failures: list[BaseException],
        group: anyio.abc.TaskGroup,
    ) -> None:
        try:
            urls[index] = await anyio.to_thread.run_sync(
                self._read_ready_line, index, abandon_on_cancel=True
            )
        except Exception as exc:  # reported once, without a group around it
            failures.append(exc)
            group.cancel_scope.cancel()

    async def _connect(
        self, handle: RemoteWorker, failures: list[BaseException], group: anyio.abc.TaskGroup
    ) -> None:
        try:
            await handle.open(token=self._token)
        except Exception as exc:
            failures.append(exc)
            group.cancel_scope.cancel()

    def _read_ready_line(self, index: int) -> str:
        """Block (a thread) until worker ``index`` prints its ready line; its URL."""
        process = self.processes[index]
        assert process.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError(
                        f"local worker {self.ids[index]} not ready within {self.start_timeout} s; "
                        f"its standard error:\n{self.log(index).strip()}"
                    )
                line = process.stdout.readline().decode(errors="replace")
                if not line:  # it exited before it was ready
                    status = process.wait(self.stop_timeout)
                    raise WorkerUnavailable(
                        f"local worker {self.ids[index]} exited with status {status} before "
                        f"it was ready; its standard error:\n{self.log(index).strip()}"
                    )
                if " ready on " in line:
                    return line.rsplit(" ", 1)[1].strip()

    async def aclose(self) -> None:
        """Close the connections and stop every process (idempotent, shielded from cancels)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as group:
                for handle in self._handles:
                    group.start_soon(handle.aclose)
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                if process.stdin is not None:
                    process.stdin.close()  # the watched pipe ends too
            async with anyio.create_task_group() as group:
                for process in self.processes:
                    group.start_soon(self._reap, process)
            for log in self._logs:
                log.close()

    def stop_processes(self) -> None:
        """Stop the processes without an event loop (blocking; what ``aclose`` does after
        closing the connections)."""
        self._closed = True
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(self.stop_timeout)
            if process.stdout is not None:
                process.stdout.close()
        for log in self._logs:
            log.close()

    async def _reap(self, process: subprocess.Popen[bytes]) -> None:
        try:
            await anyio.to_thread.run_sync(process.wait, self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await anyio.to_thread.run_sync(process.wait, self.stop_timeout)
        if process.stdout is not None:
            process.stdout.close()


def local_workers(
    n: int,
    threads: int | Sequence[int] | None = None,
    **worker_options: Any,
) -> LocalWorkers:
    """``n`` ``fedtensor worker`` processes on this machine, as connected handles.

    ``async with ft.local_workers(n) as workers:`` starts them on free loopback
    ports with a fresh random token, gives each its share of the cores
    (``threads``: torch threads per worker, or one value per worker; default the
    cores divided evenly), waits until each is ready (``start_timeout``, default
    120 s; a worker that fails is reported with its standard error) and stops
    them all on leaving the block, however it is left; they also stop if this
    process dies. Other keywords are worker options: ``timeout`` (each handle's),
    ``name`` (ids ``NAME-0`` ...), ``memory_quota="1G"``, ``datasets={"name":
    path}`` (``--dataset``), ``log_level``; a list gives one value per worker.
    ``warm_up`` (default on: ``--warm-up``) has each worker import what its first
    training needs before it reports ready (torch's compiler stack, for the memory
    check on ``meta`` tensors: seconds, once), so that the first round does not pay it.

    ``pin=True`` gives each worker CPUs of its own (``--cpus``, Linux; see
    :func:`pin_cores`): the kernel can then no longer put two busy workers on one
    core while another idles, which it did in about one round in ten of simulated
    clients on 2 processes on this 2-core machine (those rounds took twice as long).
    Off by default: on a machine shared with other work, a pinned worker cannot
    leave a core that something else keeps busy. ``batch_scheduling`` (default on,
    where the OS has it: ``--batch-scheduling``) keeps a worker that wakes from
    preempting the thread running on its core, which on a machine shared with its
    client was the client, still sending the other workers' frames.
    """
    return LocalWorkers(n, threads=threads, **worker_options)
