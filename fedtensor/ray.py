"""A cluster beyond this machine: fedtensor workers as Ray actors (``fedtensor[ray]``).

::

    async with ft.ray.workers(8, num_cpus=2, datasets={"digits": "/data/digits.pt"}) as workers:
        data = await ft.load_dataset(workers, "digits")    # the data never leaves the cluster
        history = await ft.fit(model, data, rounds=10)

Theory of operation
-------------------
Ray places and keeps processes; fedtensor speaks to them. Each worker is a Ray
actor (:class:`WorkerActor`) with its own resource request (``num_cpus``,
``num_gpus``, ``memory``) and, when asked, a placement group (``"spread"`` over
nodes or ``"pack"`` onto few). The actor runs a fedtensor :class:`WorkerServer`
on a thread of its own, listening on its node's address (port 0: the kernel
picks a free one) with a random token this process made; the handle
(:class:`RayWorker`, a :class:`~fedtensor.RemoteWorker`) connects to it over
fedtensor's websocket. So pointers, ``ft.federate``, ``ft.fit`` and multi-pointers
mixing Ray, process and virtual workers work as with any worker.

What crosses Ray is plain data only: the actor's constructor arguments (its
name, the token, data set names and paths, thread and quota figures) and its
answers (its URL, its process id) are ``str`` and ``int``, and every value
passes :func:`_crossing`, which refuses anything else (a tensor, a user object).
Tensors and commands travel as fedtensor frames over the websocket, never
through Ray's pickling; nothing of ours is unpickled on a worker.

Why the websocket and not frames as ``bytes`` through Ray actor calls: both were
measured (``python -m benchmarks --scale``, figures in the README's Scale
section): a Ray actor call costs a task submission, a scheduling hop and an
object-store copy for large arguments and results, so both its round trip and
its throughput for 64 MiB are worse than a direct TCP connection, and it would
need a polling loop for replies that fedtensor's connection pushes as they come.

Data on the cluster: ``datasets={"name": path}`` makes each actor load ``path``
on its own node (a ``torch.save`` of ``{"data": ..., "targets": ...}``, loaded
with ``weights_only=True``, as ``fedtensor worker --dataset NAME=FILE``), so
``ft.load_dataset(workers, "name")`` gives pointers to data the client never held.

Faults. An actor that dies (``ray.kill``, a lost node) takes its TCP connection
with it: pending pointers fail at once with :class:`~fedtensor.WorkerUnavailable`,
and ``ft.fit`` drops the worker (see :mod:`fedtensor.federated.fit`). With
``max_restarts``, Ray starts the actor again (empty: a fresh worker, its data
sets loaded again); :meth:`RayWorker.reconnect` asks Ray for the new address and
connects to it. A fit under way takes it back by itself: before each round it asks
:meth:`RayWorker.rejoin` of every worker it dropped, which looks without waiting
whether Ray has restarted the actor, and connects to it when it has; ``ft.fit`` then
makes the worker's shard again (loaded again by name for ``ft.load_dataset``, sent
again from the client's copy for ``ft.federate``, the executor's block sent again for
``ft.simulate_clients``) and samples it. ``ft.FedBuff``/``ft.FedAsync`` ask after
every update taken instead of before each round.

``import fedtensor`` does not import Ray: this module imports it when a group of
workers starts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, Self

import anyio
import anyio.abc
import anyio.to_thread

from fedtensor.client.handles import DEFAULT_TIMEOUT, RemoteWorker, WorkerGroup, require_asyncio
from fedtensor.errors import FedTensorError, WorkerUnavailable

__all__ = ["RayWorker", "RayWorkers", "WorkerActor", "workers"]

#: Seconds an actor may take to be placed and ready (Ray may have to start a worker process).
START_TIMEOUT = 120.0

#: The only types of values fedtensor passes to, or accepts from, a Ray actor.
PLAIN_TYPES = (str, bytes, int, float, bool, type(None))


def _crossing(values: Sequence[object]) -> tuple[object, ...]:
    """Every value that crosses Ray passes here: plain data only, never a pickled object.

    Tuples of plain values are plain. Anything else (a tensor, a user object) raises
    :class:`TypeError` before Ray could pickle it.
    """
    for value in values:
        if isinstance(value, tuple):
            _crossing(value)
        elif not isinstance(value, PLAIN_TYPES):
            raise TypeError(
                f"only bytes, str and numbers cross Ray in fedtensor, not {type(value).__name__}"
            )
    return tuple(values)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("fedtensor's Ray workers need ray: pip install 'fedtensor[ray]'") from exc
    return ray


class WorkerActor:
    """A fedtensor worker inside a Ray actor (this class runs in the actor's process).

    Every argument and every answer is a ``str``, ``int`` or ``bytes`` (see
    :func:`_crossing`); the worker's clients reach it over its websocket.
    """

    def __init__(
        self,
        id: str,
        token: str,
        host: str,
        datasets: tuple[str, ...],
        threads: int,
        memory_quota: int,
    ) -> None:
        import torch

        from fedtensor.cli import ConfigurationError, _datasets
        from fedtensor.worker.server import Limits, WorkerServer

        _crossing((id, token, host, datasets, threads, memory_quota))
        try:
            loaded = _datasets(datasets)  # NAME=PATH, on this node
        except ConfigurationError as exc:
            raise FedTensorError(f"Ray worker {id}: {exc}") from None
        if threads > 0:
            torch.set_num_threads(threads)
        if not host:
            host = _import_ray().util.get_node_ip_address()
        self._server = WorkerServer(
            id,
            token=token,
            limits=Limits(memory_quota=memory_quota or None),
            datasets=loaded,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._url = ""
        self._error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(host, ready), name=f"fedtensor-ray-{id}", daemon=True
        )
        self._thread.start()
        if not ready.wait(START_TIMEOUT):
            raise FedTensorError(f"Ray worker {id}: the websocket server did not start")
        if self._error is not None:
            raise FedTensorError(f"Ray worker {id} cannot listen on {host}: {self._error}")

    def _serve(self, host: str, ready: threading.Event) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            try:
                async with anyio.create_task_group() as group:
                    self._url = await group.start(self._server.serve, host, 0)
                    ready.set()
            except BaseException as exc:
                self._error = exc
                raise

        try:
            asyncio.run(serve())
        except BaseException:  # reported by __init__ through self._error
            pass
        finally:
            ready.set()

    def url(self) -> str:
        """The worker's websocket URL."""
        return self._url

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()

    def stop(self) -> bool:
        """Finish the commands received, close the connections; True once stopped."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._server.shutdown)
        self._thread.join(30)
        return not self._thread.is_alive()

    def echo(self, frame: bytes) -> bytes:
        """The frame back: the alternative transport (frames through Ray calls), measured
        by ``python -m benchmarks --scale``."""
        return frame


async def _ask(method: Any, *args: object, timeout: float) -> Any:
    """Call an actor's method through Ray, with plain arguments, and wait for its answer."""
    ray = _import_ray()
    reference = method.remote(*_crossing(args))

    def wait() -> Any:
        return ray.get(reference, timeout=timeout)

    try:
        answer = await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
    except ray.exceptions.GetTimeoutError as exc:
        raise WorkerUnavailable(f"a Ray worker did not answer in {timeout} s") from exc
    except ray.exceptions.RayError as exc:
        raise WorkerUnavailable(f"a Ray worker is gone: {_reason(exc)}") from exc
    _crossing((answer,))
    return answer


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


class RayWorker(RemoteWorker):
    """A handle to a fedtensor worker that runs as a Ray actor."""

    def __init__(self, url: str, actor: Any, token: str, *, timeout: float) -> None:
        super().__init__(url, timeout=timeout)
        self.actor = actor
        self._token = token
        #: Ray's answer-to-be of the restarted actor's URL, while :meth:`rejoin` waits for it.
        self._restarted: Any = None
        #: Why the actor will not come back (Ray gave up restarting it), once known.
        self._gone: str | None = None

    async def rejoin(self) -> bool:
        """Whether the worker is reachable again; never waits for Ray to restart it.

        ``ft.fit`` asks this before each round about a worker it dropped as
        unavailable. The first call after the connection dropped asks Ray for the
        actor's URL (an actor call, which Ray holds until the restarted actor
        serves); each call looks, without waiting, whether the answer came: then
        the handle connects to the new, empty worker and this returns True. False
        while Ray restarts the actor, and for good once Ray says it is dead
        (no ``max_restarts`` left).
        """
        if self._client is not None and self._client.available:
            return True
        if self._gone is not None:
            return False
        ray = _import_ray()
        if self._restarted is None:
            self._restarted = self.actor.url.remote()
        ready, _ = await anyio.to_thread.run_sync(partial(ray.wait, [self._restarted], timeout=0))
        if not ready:
            return False
        reference, self._restarted = self._restarted, None
        try:
            (url,) = _crossing((ray.get(reference, timeout=self.timeout),))  # ready: no wait
        except ray.exceptions.RayError as exc:
            self._gone = _reason(exc)
            return False
        try:
            await self._connect(str(url))
        except (FedTensorError, OSError, TimeoutError):
            return False  # not serving yet: the next call asks Ray again
        return True

    async def reconnect(self) -> None:
        """Connect to the worker again, at its new address if Ray restarted it.

        A restarted actor is a fresh worker: pointers made before it died stay
        failed (its data sets, loaded again, are reached anew with ``ft.load_dataset``).
        """
        url = await _ask(self.actor.url, timeout=self.timeout)
        if url == self.url and self._client is not None and self._client.available:
            return
        await self._connect(url)

    async def _connect(self, url: str) -> None:
        """Close the old connection, connect to the worker at ``url``."""
        if self._client is not None:
            await self._client.aclose()
        self.url = url
        with anyio.fail_after(self.timeout):
            await self._open_client(url, token=self._token)

    def __repr__(self) -> str:
        return f"<RayWorker id:{self.id} {self.url}>"


class RayWorkers(WorkerGroup[RayWorker]):
    """``n`` fedtensor workers as Ray actors, a connected handle to each (see :func:`workers`)."""

    def __init__(
        self,
        n: int,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        memory: int | None = None,
        address: str | None = None,
        placement: Literal["spread", "pack"] | None = None,
        max_restarts: int = 0,
        datasets: Mapping[str, str | os.PathLike[str]] | None = None,
        host: str | None = None,
        memory_quota: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
        name: str = "ray",
    ) -> None:
        if n < 1:
            raise ValueError("ft.ray.workers needs n >= 1")
        if placement not in (None, "spread", "pack"):
            raise ValueError(f"placement must be None, 'spread' or 'pack', not {placement!r}")
        self.ids = [f"{name}-{index}" for index in range(n)]
        self.num_cpus, self.num_gpus, self.memory = num_cpus, num_gpus, memory
        self.address, self.placement, self.max_restarts = address, placement, max_restarts
        self.datasets = tuple(f"{k}={os.fspath(v)}" for k, v in (datasets or {}).items())
        self.host = host or ""
        self.memory_quota = memory_quota or 0
        self.timeout, self.start_timeout = timeout, start_timeout
        self.actors: list[Any] = []
        self._handles: list[RayWorker] = []
        self._token = secrets.token_urlsafe(32)
        self._placement_group: Any = None
        self._started_ray = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<RayWorkers {', '.join(self.ids)}>"

    async def start(self) -> Self:
        """Start the actors, wait until each serves, connect to each; returns ``self``."""
        require_asyncio("ft.ray.workers")
        if self.actors or self._closed:
            raise FedTensorError("these Ray workers were started already")
        try:
            await anyio.to_thread.run_sync(self._create_actors)
            urls = await self._gather(
                [partial(_ask, actor.url, timeout=self.start_timeout) for actor in self.actors]
            )
            self._handles = [
                RayWorker(url, actor, self._token, timeout=self.timeout)
                for url, actor in zip(urls, self.actors, strict=True)
            ]
            await self._gather([partial(h.open, token=self._token) for h in self._handles])
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _gather(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Run ``calls`` concurrently; their results, or the first failure (not a group)."""
        results: list[Any] = [None] * len(calls)
        failures: list[BaseException] = []

        async def run(index: int, group: anyio.abc.TaskGroup) -> None:
            try:
                results[index] = await calls[index]()
            except Exception as exc:
                failures.append(exc)
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for index in range(len(calls)):
                group.start_soon(run, index, group)
        if failures:
            raise failures[0]
        return results

    def _create_actors(self) -> None:
        """Blocking (a thread): Ray's calls to place the actors."""
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False)
            self._started_ray = True
        resources: dict[str, float] = {"CPU": self.num_cpus}
        if self.num_gpus:
            resources["GPU"] = self.num_gpus
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_restarts": self.max_restarts,
            # A call made while Ray restarts the actor (reconnect's) waits for it: they
            # only ask for its address or pid, which any incarnation may answer.
            "max_task_retries": -1 if self.max_restarts else 0,
        }
        if self.memory is not None:
            options["memory"] = self.memory
            resources["memory"] = self.memory
        strategies: list[Any] = [None] * len(self.ids)
        if self.placement is not None:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = placement_group([resources] * len(self.ids), strategy=self.placement.upper())
            self._placement_group = group
            if not group.wait(timeout_seconds=self.start_timeout):
                raise WorkerUnavailable(
                    f"Ray could not place {len(self.ids)} workers of {resources} "
                    f"({self.placement}) in {self.start_timeout} s"
                )
            strategies = [
                PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=index
                )
                for index in range(len(self.ids))
            ]
        actor_class = ray.remote(WorkerActor)
        threads = max(1, int(self.num_cpus))
        for id_, strategy in zip(self.ids, strategies, strict=True):
            chosen = dict(options)
            if strategy is not None:
                chosen["scheduling_strategy"] = strategy
            arguments = _crossing(
                (id_, self._token, self.host, self.datasets, threads, self.memory_quota)
            )
            self.actors.append(actor_class.options(**chosen).remote(*arguments))

    async def aclose(self) -> None:
        """Close the connections, end the actors (idempotent, shielded from cancels)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for handle in self._handles:
                await handle.aclose()
            await anyio.to_thread.run_sync(self._end_actors)

    def _end_actors(self) -> None:
        if not self.actors and not self._started_ray and self._placement_group is None:
            return
        ray = _import_ray()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._placement_group)
        if self._started_ray:
            ray.shutdown()


def workers(
    n: int,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    memory: int | None = None,
    address: str | None = None,
    placement: Literal["spread", "pack"] | None = None,
    max_restarts: int = 0,
    datasets: Mapping[str, str | os.PathLike[str]] | None = None,
    **options: Any,
) -> RayWorkers:
    """``n`` fedtensor workers as Ray actors: ``async with ft.ray.workers(n) as workers:``.

    Each actor asks Ray for ``num_cpus``, ``num_gpus`` and ``memory`` (bytes), is
    placed by Ray (``placement="spread"`` over nodes or ``"pack"`` onto few, with a
    placement group), and serves fedtensor's websocket on its node's address
    (``host=`` to choose) with a random token. The Ray instance: the one this
    process is connected to, else ``ray.init(address)`` (``None``: a new local one,
    ``"auto"`` or ``"ray://..."``: a cluster), shut down again on leaving the block.
    ``datasets={"name": path}``: each actor loads ``path`` on its node, for
    ``ft.load_dataset``. ``max_restarts``: Ray restarts a dead actor that many
    times (empty; :meth:`RayWorker.reconnect` reaches it). Other options:
    ``memory_quota`` (bytes one client may store), ``timeout`` (each handle's),
    ``start_timeout``, ``name`` (ids ``NAME-0`` ...).
    """
    return RayWorkers(
        n,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory=memory,
        address=address,
        placement=placement,
        max_restarts=max_restarts,
        datasets=datasets,
        **options,
    )
