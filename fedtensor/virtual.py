"""Virtual workers: a worker actor in this process, and the handle that reaches it.

A :class:`VirtualWorker` sits above both halves of the runtime: it runs a
:class:`~fedtensor.worker.actor.WorkerActor`, publishes it as ``memory://ID``, and is the
client's :class:`~fedtensor.client.handles.WorkerHandle` to it. It lives here, not in the
client layer, so that the client never imports worker code.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import torch

from fedtensor.client.engine import Client
from fedtensor.client.handles import (
    DEFAULT_TIMEOUT,
    ReadOnlyDict,
    WorkerHandle,
    encode_by_default,
)
from fedtensor.worker.actor import WorkerActor, in_process_workers

__all__ = ["VirtualWorker"]


class VirtualWorker(WorkerHandle):
    """A worker in this process: an actor with its own mailbox and object store.

    Use it as an async context manager::

        async with ft.VirtualWorker("bob") as bob:
            x = ft.send(torch.ones(3), bob)

    ``encode=True`` makes its connection encode every batch to wire frames, as a
    network transport does (default: the ``FEDTENSOR_MEMORY_ENCODE`` variable).
    ``datasets`` are data sets the worker holds itself, by name, as ``(examples,
    labels)`` tensors: clients reach them with :func:`fedtensor.load_dataset`.
    """

    def __init__(
        self,
        id: str = "bob",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        encode: bool | None = None,
        datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__(id, timeout=timeout)
        self._encode = encode
        self._datasets = dict(datasets or {})
        self._actor: WorkerActor | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> VirtualWorker:
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            await self._start(task_group)
        except BaseException as exc:
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            await task_group.__aexit__(None, None, None)

    async def _start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Run the actor in ``task_group``, publish it as ``memory://ID``, connect to it."""
        actor = WorkerActor(self.id, datasets=self._datasets)
        await task_group.start(actor.serve)
        self._actor = actor
        in_process_workers()[self.id] = actor
        encode = encode_by_default() if self._encode is None else self._encode
        await self._open_client(f"memory://{self.id}", encode=encode)

    async def _stop(self) -> None:
        """Close the connection, free every object, end the actor's task."""
        await self.aclose()
        actor = self._actor
        if actor is not None:
            actor.close()
            if in_process_workers().get(self.id) is actor:
                del in_process_workers()[self.id]

    # -- the object store, as the seed notebook shows it -----------------------------------------

    @property
    def objects(self) -> Mapping[int, Any]:
        """A snapshot of every object stored on this worker, by id (read-only).

        It reflects every command sent before it was read: pending commands run first.
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
        return ReadOnlyDict(actor.iter_objects())

    async def _objects_on_loop(self) -> Mapping[int, Any]:
        return self.objects

    _objects = objects

    def __repr__(self) -> str:
        return f"<VirtualWorker id:{self.id} #objects:{len(self.objects)}>"


def _loop_thread(client: Client) -> int:
    return client._thread
