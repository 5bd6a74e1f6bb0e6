"""Virtual workers: a worker actor in this process, and the handle that reaches it.

A :class:`VirtualWorker` sits above both halves of the runtime: it runs a
:class:`~fedtensor.worker.actor.WorkerActor`, publishes it as ``memory://ID``, and is the
client's :class:`~fedtensor.client.handles.WorkerHandle` to it. It lives here, not in the
client layer, so that the client never imports worker code.

Theory of operation
-------------------
A virtual worker owns no task and no task group. Its actor is passive: a letter
posted to its mailbox schedules one callback on the running event loop, which runs
everything queued by then, and a client that needs an answer at once runs the
mailbox on its own stack (see :mod:`fedtensor.worker.actor`). Nothing in it waits,
so nothing needs a task to wait in; and with no task there is no cancel scope to
enter in one task and leave in another. Hence:

- ``start()`` and ``aclose()`` are ordinary coroutines that may run in any task, in
  any order relative to other workers: ``async with``, ``await w.start()`` ...
  ``await w.aclose()``, an :class:`contextlib.AsyncExitStack`, or a close from a
  task other than the opener's all work alike.
- Opening or closing one worker costs the same however many others are open: a
  registry entry, one session, one client. (A task group per worker, entered by
  hand, nests each new worker's cancel scope inside the last one's; closing N
  such workers costs time quadratic in N.)
- ``aclose()`` is complete and synchronous at its core: the client is closed
  (pending pointers fail with :class:`~fedtensor.WorkerUnavailable`), the actor is
  closed (its mailbox emptied, every object freed, other clients told), and the
  ``memory://ID`` name is given up, so a new worker may take it. A second
  ``aclose()`` does nothing; a closed worker does not start again.

The runtime is asyncio's (the client engine's futures and timers are asyncio's);
uvloop works, trio does not, and starting a worker without a running asyncio loop
raises a :class:`~fedtensor.FedTensorError` that says so.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtensor.client.engine import Client
from fedtensor.client.handles import (
    DEFAULT_TIMEOUT,
    ReadOnlyDict,
    WorkerHandle,
    encode_by_default,
    require_asyncio,
)
from fedtensor.errors import FedTensorError
from fedtensor.worker.actor import WorkerActor, in_process_workers

__all__ = ["VirtualWorker"]


class VirtualWorker(WorkerHandle):
    """A worker in this process: an actor with its own mailbox and object store.

    Use it as an async context manager::

        async with ft.VirtualWorker("bob") as bob:
            x = ft.send(torch.ones(3), bob)

    or open and close it explicitly, from any task: ``bob = await
    ft.VirtualWorker("bob").start()`` ... ``await bob.aclose()``.

    ``encode=True`` makes its connection encode every batch to wire frames, as a
    network transport does (default: the ``FEDTENSOR_MEMORY_ENCODE`` variable).
    ``datasets`` are data sets the worker holds itself, by name, as ``(examples,
    labels)`` tensors: clients reach them with :func:`fedtensor.load_dataset`.
    ``step_delay`` (for tests and benchmarks only) sleeps that many seconds after
    every local training step, on the event loop: a simulated slow worker.
    """

    def __init__(
        self,
        id: str = "bob",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        encode: bool | None = None,
        datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        step_delay: float = 0.0,
        dataset_tags: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(id, timeout=timeout)
        # Tags a search finds each data set by, besides NAME and #NAME (worker/catalog.py).
        self._dataset_tags = dataset_tags
        if not step_delay >= 0:
            raise ValueError("step_delay must be at least 0")
        self._step_delay = step_delay
        self._encode = encode
        self._datasets = datasets  # the actor takes its own copy when it starts
        self._actor: WorkerActor | None = None
        self._started = False

    async def start(self) -> VirtualWorker:
        """Make the actor, publish it as ``memory://ID``, connect to it; returns ``self``."""
        require_asyncio("ft.VirtualWorker")
        if self._started:
            raise FedTensorError(f"virtual worker {self.id!r} was already started")
        self._started = True
        actor = self._actor = WorkerActor(
            self.id, datasets=self._datasets, step_delay=self._step_delay
        )
        actor.exchange.set_dataset_tags(self._dataset_tags)
        # A newer worker of the same id takes the name over; closing this one frees it only
        # while it is still this actor's (see _retire).
        in_process_workers()[self.id] = actor
        encode = encode_by_default() if self._encode is None else self._encode
        try:
            await self._open_client(f"memory://{self.id}", encode=encode)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Close the connection, stop the actor and free every object (idempotent)."""
        actor, self._actor = self._actor, None
        try:
            await super().aclose()
        finally:
            if actor is not None:
                _retire(actor)

    async def __aenter__(self) -> VirtualWorker:
        return await self.start()

    # -- the object store, as the seed notebook shows it -----------------------------------------

    @property
    def objects(self) -> Mapping[int, Any]:
        """A snapshot of every object stored on this worker, by id (read-only).

        It reflects every command sent before it was read: pending commands run first.
        On a blocking worker (:mod:`fedtensor.sync`), PySyft's ``bob._objects.clear()``
        frees this client's objects (see :meth:`clear_objects`); async code awaits
        ``bob.clear_objects()``.
        """
        actor = self._actor
        if actor is None:
            return {}
        client = self._client
        if client is not None and client.available:
            if threading.get_ident() == _loop_thread(client):
                client.drain()
            else:
                return client.run_threadsafe(self._objects_on_loop(), None)  # type: ignore[no-any-return]
        return ReadOnlyDict(
            actor.iter_objects(), clear=self.clear_objects if self._blocking else None
        )

    async def _objects_on_loop(self) -> Mapping[int, Any]:
        return self.objects

    _objects = objects

    @property
    def _tensors(self) -> Mapping[int, torch.Tensor]:
        """PySyft 0.2's ``bob._tensors``: the tensors among :attr:`objects` (read-only).

        Secret shares show here as the ring elements (int64) each worker holds.
        """
        return ReadOnlyDict(
            (id_, value) for id_, value in self.objects.items() if isinstance(value, torch.Tensor)
        )

    def __repr__(self) -> str:
        return f"<VirtualWorker id:{self.id} #objects:{len(self.objects)}>"


def _retire(actor: WorkerActor) -> None:
    """Close ``actor`` and give up its ``memory://`` name, if the name is still its own.

    Call it on the actor's event loop thread.
    """
    actor.close()
    registry = in_process_workers()
    if registry.get(actor.id) is actor:
        del registry[actor.id]


def _loop_thread(client: Client) -> int:
    return client._thread
