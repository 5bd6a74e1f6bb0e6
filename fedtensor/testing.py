"""The fedtensor pytest plugin: ready workers for your own tests, with leak checks.

Installed with fedtensor (entry point ``pytest11``), it needs no set-up beyond
marking async tests for anyio (``pytestmark = pytest.mark.anyio``)::

    async def test_mean(ft_worker):
        x = ft.send(torch.tensor([1.0, 3.0]), ft_worker)
        assert await x.mean().get() == 2.0

Fixtures
--------
``ft_worker``
    An open worker handle named ``"bob"``, reached over ``ft_transport``.
``ft_workers``
    A factory: ``await ft_workers("alice", timeout=5)`` opens one more.
``ft_transport``
    How ``ft_workers`` reaches its workers: ``"objects"`` (an in-process
    :class:`~fedtensor.VirtualWorker`), ``"encoded"`` (the same, every batch
    encoded to wire frames) or ``"ws"`` (a worker *process* on a free loopback
    port, reached over websockets with a token; one process per name, started
    on first use and shared by the test session, each test a new client with
    its own namespace). Default: ``"objects"`` (``"encoded"`` when the variable
    ``FEDTENSOR_MEMORY_ENCODE`` is set). Override it, parametrized over all
    three, to run a suite against every transport.
``ft_virtual_workers``
    A factory of in-process :class:`~fedtensor.VirtualWorker` s whatever the
    transport, for tests of the in-process store; ``ft_encode`` says whether
    they encode (default: the environment variable).
``ft_worker_processes``
    A factory of fresh worker processes, stopped after the test:
    ``ft_worker_processes("bob", "--memory-quota", "1M")`` gives a
    :class:`WorkerProcess` (its ``url``, ``token``, ``stop()``, ``kill()``).

Every worker these fixtures open is closed after the test, and the test fails
if it left objects on a worker (pointers still alive, or released without
effect), unless it is marked ``@pytest.mark.ft_keep_objects``.
"""

from __future__ import annotations

import gc
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import IO, Any

import pytest

from fedtensor.client.handles import WorkerHandle, connect, encode_by_default
from fedtensor.virtual import VirtualWorker

__all__ = [
    "WorkerFactory",
    "WorkerProcess",
    "ft_encode",
    "ft_process_pool",
    "ft_transport",
    "ft_virtual_workers",
    "ft_worker",
    "ft_worker_processes",
    "ft_workers",
    "leftover_objects",
    "start_worker_process",
]

WorkerFactory = Callable[..., Awaitable[Any]]

#: How long a worker process may take to start (it imports torch).
START_TIMEOUT = 90.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ft_keep_objects: do not fail the test for objects left on its workers"
    )


# -- worker processes -----------------------------------------------------------------------------


class WorkerProcess:
    """A ``fedtensor worker`` process on a free loopback port."""

    def __init__(
        self, id: str, url: str, token: str, process: subprocess.Popen[str], log: IO[str]
    ) -> None:
        self.id = id
        self.url = url
        self.token = token
        self.process = process
        self._log = log
        self._final_log = ""

    def log(self) -> str:
        """What the process has written to its standard error (so far)."""
        if self._log.closed:
            return self._final_log
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout``; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._close_files()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the worker dies mid-whatever, as a crashed machine would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def _close_files(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()
        if not self._log.closed:
            self._final_log = self.log()
            self._log.close()

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.id} {self.url} pid {self.process.pid}>"


def start_worker_process(
    id: str,
    *args: str,
    token: str | None = None,
    timeout: float = START_TIMEOUT,
) -> WorkerProcess:
    """Start ``fedtensor worker --id ID --port 0`` on 127.0.0.1 and wait until it is ready."""
    token = token if token is not None else secrets.token_urlsafe(24)
    # Closed by WorkerProcess.stop(); a pipe could fill up and stall the worker.
    log = tempfile.TemporaryFile("w+", prefix=f"fedtensor-worker-{id}-")  # noqa: SIM115
    command = [sys.executable, "-m", "fedtensor", "worker", "--id", id]
    command += ["--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "FEDTENSOR_TOKEN": token},
    )
    worker = WorkerProcess(id, "", token, process, log)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                worker.stop()
                raise TimeoutError(f"worker {id} not ready in {timeout} s:\n{worker.log()}")
            line = process.stdout.readline()
            if not line:  # the process exited
                process.wait(10)
                message = f"worker {id} exited with {process.returncode}:\n{worker.log()}"
                worker._close_files()
                raise RuntimeError(message)
            if " ready on " in line:
                worker.url = line.rsplit(" ", 1)[1].strip()
                return worker


@pytest.fixture(scope="session")
def ft_process_pool() -> Iterator[dict[str, WorkerProcess]]:
    """Worker processes by name, started on first use, shared by the session."""
    pool: dict[str, WorkerProcess] = {}
    yield pool
    for process in pool.values():
        process.stop()


@pytest.fixture
def ft_worker_processes() -> Iterator[Callable[..., WorkerProcess]]:
    """A factory of fresh worker processes, stopped after the test."""
    started: list[WorkerProcess] = []

    def start(id: str, *args: str, token: str | None = None) -> WorkerProcess:
        process = start_worker_process(id, *args, token=token)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# -- worker handles -------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    """fedtensor's runtime is asyncio-based."""
    return "asyncio"


@pytest.fixture
def ft_encode() -> bool:
    """Whether in-process workers encode batches to wire frames."""
    return encode_by_default()


@pytest.fixture
def ft_transport() -> str:
    """How ``ft_workers`` reaches workers: ``"objects"``, ``"encoded"`` or ``"ws"``."""
    return "encoded" if encode_by_default() else "objects"


async def leftover_objects(workers: list[WorkerHandle]) -> dict[str, list[int]]:
    """Ids each client still holds on ``workers`` once unreachable pointers are collected."""
    gc.collect()
    leftovers = {}
    for worker in workers:
        if worker.client.available:
            ids = await worker.object_ids(timeout=30)
            if ids:
                leftovers[worker.id] = ids
    return leftovers


async def _checked_factory(
    request: pytest.FixtureRequest, open_one: Callable[[AsyncExitStack, str, Any], Awaitable[Any]]
) -> AsyncIterator[WorkerFactory]:
    opened: list[WorkerHandle] = []
    async with AsyncExitStack() as stack:

        async def factory(id: str = "bob", **options: Any) -> Any:
            worker = await open_one(stack, id, options)
            opened.append(worker)
            return worker

        yield factory
        if request.node.get_closest_marker("ft_keep_objects") is None:
            leftovers = await leftover_objects(opened)
            if leftovers:
                pytest.fail(f"objects left on workers after the test: {leftovers}")


@pytest.fixture
async def ft_virtual_workers(
    request: pytest.FixtureRequest, ft_encode: bool
) -> AsyncIterator[WorkerFactory]:
    """A factory of open in-process workers, closed (and leak-checked) after the test."""

    async def open_one(stack: AsyncExitStack, id: str, options: dict[str, Any]) -> Any:
        options.setdefault("encode", ft_encode)
        return await stack.enter_async_context(VirtualWorker(id, **options))

    async for factory in _checked_factory(request, open_one):
        yield factory


@pytest.fixture
async def ft_workers(
    request: pytest.FixtureRequest,
    ft_transport: str,
    ft_process_pool: dict[str, WorkerProcess],
) -> AsyncIterator[WorkerFactory]:
    """A factory of open workers over ``ft_transport``, closed and leak-checked after the test."""

    async def open_one(stack: AsyncExitStack, id: str, options: dict[str, Any]) -> Any:
        if ft_transport in ("objects", "encoded"):
            options.setdefault("encode", ft_transport == "encoded")
            return await stack.enter_async_context(VirtualWorker(id, **options))
        if ft_transport != "ws":
            raise ValueError(f"unknown ft_transport {ft_transport!r}")
        process = ft_process_pool.get(id)
        if process is None or process.process.poll() is not None:
            process = ft_process_pool[id] = start_worker_process(id)
        return await stack.enter_async_context(connect(process.url, token=process.token, **options))

    async for factory in _checked_factory(request, open_one):
        yield factory


@pytest.fixture
async def ft_worker(ft_workers: WorkerFactory) -> Any:
    """An open worker named ``bob`` over ``ft_transport``."""
    return await ft_workers("bob")
