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

from fedtensor import local as _local
from fedtensor import virtual as _virtual
from fedtensor.client import handles as _workers
from fedtensor.client import modules as _modules
from fedtensor.client import pointer as _pointer
from fedtensor.client import sharing as _sharing
from fedtensor.client.engine import run_on_loop
from fedtensor.client.handles import DEFAULT_TIMEOUT, LocalWorker, RemoteWorker
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
from fedtensor.federated.fit import History
from fedtensor.sync import sandbox as _sandbox
from fedtensor.sync.fl import BaseDataset, FederatedDataLoader, FederatedDataset
from fedtensor.sync.plans import Plan, PlanNotBuilt, func2plan
from fedtensor.sync.sandbox import PrivateGridNetwork, create_sandbox

# The exceptions are fedtensor's own (the same classes as ``fedtensor.RemoteError`` ...), so
# a script written against either API catches the other's errors.
__all__ = [
    "AuthenticationFailed",
    "BaseDataset",
    "FedTensorError",
    "FederatedDataLoader",
    "FederatedDataset",
    "ForbiddenOperation",
    "LimitExceeded",
    "LocationError",
    "ObjectNotFound",
    "Plan",
    "PlanError",
    "PlanNotBuilt",
    "PointerReleased",
    "PrivateGridNetwork",
    "ProtocolError",
    "RemoteError",
    "TimeoutError",
    "TorchHook",
    "TransportNotFound",
    "VirtualWorker",
    "WorkerUnavailable",
    "connect",
    "create_sandbox",
    "fit",
    "func2plan",
    "load_dataset",
    "local_worker",
    "local_workers",
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


#: The local worker (PySyft's ``sy.local_worker``, ``me``): the ``owner`` of every pointer.
local_worker: LocalWorker = _workers.local_worker()


class TorchHook:
    """Adds ``Tensor.send`` and ``Module.send``/``get``/``copy``/``move`` (nothing is
    patched until a hook is made).

    ``hook.local_worker`` is the local worker; ``hook.unhook()`` takes the
    method away again.
    """

    def __init__(self, torch_module: Any = torch) -> None:
        self.torch = torch_module
        self.local_worker: LocalWorker = _workers.local_worker()
        torch_module.Tensor.send = _tensor_send
        # PySyft's t.tag("#x") / t.describe("...") before sending (fedtensor.client.transfer)
        torch_module.Tensor.tag = _tensor_tag
        torch_module.Tensor.describe = _tensor_describe
        # PySyft's x.fix_precision().share(bob, alice, crypto_provider=charlie)
        # (fedtensor.client.sharing).
        for name, method in _SHARING_METHODS.items():
            setattr(torch_module.Tensor, name, method)
            # ...and of a pointer's data, which its worker shares (PySyft's Part 10).
            setattr(_pointer.PointerBase, name, method)
        # PySyft's t.copy(): a remote parameter copied on its worker, a local tensor cloned.
        if not hasattr(torch_module.Tensor, "copy"):
            torch_module.Tensor.copy = _tensor_copy
        # PySyft's remote models: model.send(bob), .get(), .copy(), .move(alice)
        # (fedtensor.client.modules).
        for name, method in _MODULE_METHODS.items():
            setattr(torch_module.nn.Module, name, method)

    def unhook(self) -> None:
        for name, method in _MODULE_METHODS.items():
            if getattr(self.torch.nn.Module, name, None) is method:
                delattr(self.torch.nn.Module, name)
        if getattr(self.torch.Tensor, "send", None) is _tensor_send:
            del self.torch.Tensor.send
        for name, method in (("tag", _tensor_tag), ("describe", _tensor_describe)):
            if getattr(self.torch.Tensor, name, None) is method:
                delattr(self.torch.Tensor, name)
        for name, method in _SHARING_METHODS.items():
            if getattr(self.torch.Tensor, name, None) is method:
                delattr(self.torch.Tensor, name)
            if getattr(_pointer.PointerBase, name, None) is method:
                delattr(_pointer.PointerBase, name)
        if getattr(self.torch.Tensor, "copy", None) is _tensor_copy:
            del self.torch.Tensor.copy


def _module_send(self: torch.nn.Module, *workers: _workers.WorkerHandle) -> torch.nn.Module:
    return _modules.send_model(self, *workers)


def _module_get(self: torch.nn.Module, *, timeout: float | None = None) -> Any:
    return _modules.get_model_blocking(self, timeout=timeout)


def _module_copy(self: torch.nn.Module) -> torch.nn.Module:
    return _modules.copy_model(self)


def _module_move(
    self: torch.nn.Module, worker: _workers.WorkerHandle, *, timeout: float | None = None
) -> Any:
    return _modules.move_model_blocking(self, worker, timeout=timeout)


_MODULE_METHODS = {
    "send": _module_send,
    "get": _module_get,
    "copy": _module_copy,
    "move": _module_move,
}


def _tensor_send(self: torch.Tensor, *workers: _workers.WorkerHandle, **options: Any) -> Any:
    return send(self, *workers, **options)


def _tensor_tag(self: torch.Tensor, *tags: str) -> torch.Tensor:
    """Tags that ``send`` gives the remote tensor, for ``worker.search``; returns ``self``."""
    self.tags = {*(getattr(self, "tags", None) or ()), *tags}  # type: ignore[attr-defined]
    return self


def _tensor_describe(self: torch.Tensor, description: str) -> torch.Tensor:
    """A description that ``send`` gives the remote tensor; returns ``self``."""
    self.description = description  # type: ignore[attr-defined]
    return self


def _tensor_fix_precision(
    self: torch.Tensor, precision_fractional: int = _sharing.DEFAULT_PRECISION
) -> Any:
    """PySyft's ``fix_precision()``: ``round(x * 10**precision_fractional)`` as int64 (of a
    pointer or remote parameter: a ``RemoteFixedPrecision``, shared by its worker)."""
    return _sharing.fix_precision(self, precision_fractional)


def _tensor_copy(self: torch.Tensor) -> Any:
    """PySyft's ``copy()``: of a remote model's parameter, a pointer to a copy on its
    worker; of a local tensor, a clone."""
    if _modules.is_remote(self):
        return self.pointer.copy()  # type: ignore[attr-defined]
    return self.clone()


def _tensor_share(
    self: torch.Tensor,
    *workers: _workers.WorkerHandle,
    crypto_provider: _workers.WorkerHandle | None = None,
) -> Any:
    """PySyft's ``share`` of an integer tensor (floats: ``fix_precision()`` first)."""
    return _sharing.share(self, *workers, crypto_provider=crypto_provider)


_SHARING_METHODS = {
    "fix_precision": _tensor_fix_precision,
    "fix_prec": _tensor_fix_precision,
    "share": _tensor_share,
}


def send(
    tensor: torch.Tensor | torch.nn.Module, *workers: _workers.WorkerHandle, **options: Any
) -> Any:
    """Send a copy of ``tensor`` to each worker (see :func:`fedtensor.send`; ``tags=``,
    ``description=``)."""
    return _workers.send(tensor, *workers, **options)


def VirtualWorker(
    hook: TorchHook | None = None,
    id: str = "bob",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    encode: bool | None = None,
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    dataset_tags: Mapping[str, Sequence[str]] | None = None,
    data: Sequence[torch.Tensor] = (),
) -> _virtual.VirtualWorker:
    """A worker in this process whose pointers block instead of awaiting.

    ``data`` (PySyft's): tensors sent to it at once, with the tags and description
    given them (``t.tag("#x")``), held there as long as the worker lives, for
    ``worker.search``.

    It lives until :func:`shutdown` runs (at exit), or until a new blocking worker
    of the same id replaces it, as re-running a notebook cell does: the old one is
    then closed, its objects freed and its pointers fail with ``WorkerUnavailable``.
    """
    runtime = _get_runtime()
    worker = _virtual.VirtualWorker(
        id, timeout=timeout, encode=encode, datasets=datasets, dataset_tags=dataset_tags
    )
    worker._blocking = True
    runtime.call(_replace_virtual_worker(runtime, worker), timeout)
    for tensor in data:
        _sandbox._keep(worker, send(tensor, worker))
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


class LocalWorkers(_local.LocalWorkers):
    """Blocking local worker processes: ``with sy.local_workers(n) as workers:``."""

    _runtime: _Runtime | None = None

    def close(self) -> None:
        """Close the connections and stop the processes (idempotent)."""
        if self._closed or self._runtime is None:
            return
        try:
            self._runtime.call(self.aclose(), None)
        except WorkerUnavailable:  # shutdown() closed the connections and the runtime
            self.stop_processes()

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def local_workers(
    n: int, threads: int | Sequence[int] | None = None, **worker_options: Any
) -> LocalWorkers:
    """``n`` worker processes on this machine (blocking twin of :func:`fedtensor.local_workers`).

    ``with sy.local_workers(4) as workers:`` or ``workers = sy.local_workers(4)`` and
    ``workers.close()``; they also stop when this process exits.
    """
    runtime = _get_runtime()
    group = LocalWorkers(n, threads=threads, **worker_options)
    group._blocking = True
    group._runtime = runtime
    runtime.call(group.start(), None)  # bounded by the group's start_timeout
    for handle in group:
        runtime.handles.add(handle)
    return group


def fit(
    model: torch.nn.Module,
    data: _federate.FederatedDataset | FederatedDataset,
    **options: Any,
) -> History:
    """Federated training, blocking until it is done (see :func:`fedtensor.fit`); ``data``
    may also be PySyft's ``sy.FederatedDataset``."""
    if isinstance(data, FederatedDataset):
        data = data.federated()
    return _get_runtime().call(_fit.fit(model, data, **options), None)  # type: ignore[no-any-return]


def load_dataset(
    workers: Sequence[_workers.WorkerHandle],
    name: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    holdout: float = 0.0,
    seed: int = 0,
) -> _federate.FederatedDataset:
    """Pointers to a data set the workers hold (see :func:`fedtensor.load_dataset`)."""
    return _get_runtime().call(  # type: ignore[no-any-return]
        _federate.load_dataset(workers, name, timeout=timeout, holdout=holdout, seed=seed),
        timeout,
    )
