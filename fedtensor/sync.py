"""The blocking facade: fedtensor for scripts and notebooks, PySyft 0.2 style.

The seed notebook runs with only its import line changed::

    import torch as th
    import fedtensor.sync as sy

    hook = sy.TorchHook(th)                      # adds Tensor.send
    bob = sy.VirtualWorker(hook, id="bob")
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    (x + x).get()                                # tensor([ 2,  4,  6,  8, 10])

How it works: the async runtime runs on one background thread with its own
event loop (started on first use, a daemon, stopped at exit). Workers are
opened and closed on that loop with the same ``start()`` and ``aclose()`` as
async code uses: they need no task group of the runtime's. Operations on
pointers queue commands from the caller's thread without waiting; only
``get()``, ``value()`` and reading ``worker.objects`` block, each with a
timeout. Because the caller's thread never runs the runtime's loop, this also
works inside Jupyter, whose own loop is already running in the main thread.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import anyio
import torch

from fedtensor import virtual as _virtual
from fedtensor.client import handles as _workers
from fedtensor.client.engine import run_on_loop
from fedtensor.client.handles import DEFAULT_TIMEOUT, LocalWorker, RemoteWorker, local_worker
from fedtensor.errors import (
    AuthenticationFailed,
    FedTensorError,
    ForbiddenOperation,
    LimitExceeded,
    LocationError,
    ObjectNotFound,
    PlanError,
    PointerReleased,
    ProtocolError,
    RemoteError,
    TimeoutError,
    TransportNotFound,
    WorkerUnavailable,
)
from fedtensor.federated import datasets as _federate
from fedtensor.federated import fit as _fit
from fedtensor.federated.datasets import FederatedDataset
from fedtensor.federated.fit import History

# The exceptions are fedtensor's own (the same classes as ``fedtensor.RemoteError`` ...), so
# a script written against either API catches the other's errors.
__all__ = [
    "AuthenticationFailed",
    "FedTensorError",
    "ForbiddenOperation",
    "LimitExceeded",
    "LocationError",
    "ObjectNotFound",
    "PlanError",
    "PointerReleased",
    "ProtocolError",
    "RemoteError",
    "TimeoutError",
    "TorchHook",
    "TransportNotFound",
    "VirtualWorker",
    "WorkerUnavailable",
    "connect",
    "fit",
    "load_dataset",
    "local_worker",
    "send",
    "shutdown",
]


class _Runtime:
    """The background thread and event loop the blocking facade runs on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # Every blocking handle, closed properly when the runtime stops.
        self.handles: weakref.WeakSet[_workers.WorkerHandle] = weakref.WeakSet()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="fedtensor-runtime", daemon=True)
        self.thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the fedtensor runtime thread did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        with anyio.move_on_after(10):
            for handle in list(self.handles):
                await handle.aclose()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """Run ``coro`` on the runtime's loop and wait for its result."""
        return run_on_loop(
            self.loop, coro, timeout, f"the fedtensor runtime did not answer in {timeout} s"
        )

    def stop(self) -> None:
        if self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(10)


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _get_runtime() -> _Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime()
            atexit.register(shutdown)
        return _runtime


def shutdown() -> None:
    """Stop the background runtime; every blocking worker closes (runs at exit)."""
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.stop()


class TorchHook:
    """Adds ``Tensor.send`` (nothing is patched until a hook is made).

    ``hook.local_worker`` is the local worker; ``hook.unhook()`` takes the
    method away again.
    """

    def __init__(self, torch_module: Any = torch) -> None:
        self.torch = torch_module
        self.local_worker: LocalWorker = local_worker()
        torch_module.Tensor.send = _tensor_send

    def unhook(self) -> None:
        if getattr(self.torch.Tensor, "send", None) is _tensor_send:
            del self.torch.Tensor.send


def _tensor_send(self: torch.Tensor, *workers: _workers.WorkerHandle) -> Any:
    return send(self, *workers)


def send(tensor: torch.Tensor, *workers: _workers.WorkerHandle) -> Any:
    """Send a copy of ``tensor`` to each worker (see :func:`fedtensor.send`)."""
    return _workers.send(tensor, *workers)


def VirtualWorker(
    hook: TorchHook | None = None,
    id: str = "bob",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    encode: bool | None = None,
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> _virtual.VirtualWorker:
    """A worker in this process whose pointers block instead of awaiting.

    It lives until :func:`shutdown` runs (at exit), or until a new blocking worker
    of the same id replaces it, as re-running a notebook cell does: the old one is
    then closed, its objects freed and its pointers fail with ``WorkerUnavailable``.
    """
    runtime = _get_runtime()
    worker = _virtual.VirtualWorker(id, timeout=timeout, encode=encode, datasets=datasets)
    worker._blocking = True
    runtime.call(_replace_virtual_worker(runtime, worker), timeout)
    return worker


async def _replace_virtual_worker(runtime: _Runtime, worker: _virtual.VirtualWorker) -> None:
    # The in-process registry, the actor and its sessions keep a worker (and its
    # objects) reachable until it closes, so a replaced one must be closed here.
    for old in list(runtime.handles):
        if isinstance(old, _virtual.VirtualWorker) and old.id == worker.id:
            runtime.handles.discard(old)
            await old.aclose()
    await worker.start()
    runtime.handles.add(worker)


def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT, **options: Any) -> RemoteWorker:
    """Connect to the worker at ``url`` (blocking twin of :func:`fedtensor.connect`)."""
    runtime = _get_runtime()
    worker = RemoteWorker(url, timeout=timeout)
    worker._blocking = True
    runtime.call(worker._open_client(url, **options), timeout)
    runtime.handles.add(worker)
    return worker


def fit(model: torch.nn.Module, data: FederatedDataset, **options: Any) -> History:
    """Federated training, blocking until it is done (see :func:`fedtensor.fit`)."""
    return _get_runtime().call(_fit.fit(model, data, **options), None)  # type: ignore[no-any-return]


def load_dataset(
    workers: Sequence[_workers.WorkerHandle], name: str, *, timeout: float = DEFAULT_TIMEOUT
) -> FederatedDataset:
    """Pointers to a data set the workers hold (see :func:`fedtensor.load_dataset`)."""
    return _get_runtime().call(  # type: ignore[no-any-return]
        _federate.load_dataset(workers, name, timeout=timeout), timeout
    )
