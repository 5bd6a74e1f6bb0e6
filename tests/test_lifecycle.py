"""Workers' lifecycles: open and close in any order, from any task; a close is complete."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest
import torch

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.abc import Connection, ReplySink, Transport
from fedtensor.client.handles import require_asyncio
from fedtensor.protocol.messages import Store
from fedtensor.transports.memory import MemoryTransport
from fedtensor.worker.actor import WorkerActor, in_process_workers

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[("asyncio", {}), ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def actor_of(worker: ft.VirtualWorker) -> WorkerActor:
    actor = worker._actor
    assert actor is not None
    return actor


async def assert_serves(worker: ft.WorkerHandle, value: float) -> None:
    x = ft.send(torch.full((2,), value), worker)
    assert torch.equal(await (x * 2).get(), torch.full((2,), 2 * value))


def assert_closed(actor: WorkerActor) -> None:
    assert actor.closed
    assert actor.object_count() == 0
    assert not actor._letters
    assert in_process_workers().get(actor.id) is not actor


# -- any order, any task ---------------------------------------------------------------------------


async def test_workers_close_in_the_order_they_were_opened() -> None:
    workers = [await ft.VirtualWorker(f"fifo-{i}").start() for i in range(8)]
    actors = [actor_of(worker) for worker in workers]
    for i, worker in enumerate(workers):
        await assert_serves(worker, i)
    for i, worker in enumerate(workers):
        await worker.aclose()
        assert_closed(actors[i])
        for later, actor in zip(workers[i + 1 :], actors[i + 1 :], strict=True):
            assert not actor.closed
            await assert_serves(later, i)


async def test_open_and_close_pairs_interleave() -> None:
    a = await ft.VirtualWorker("pair-a").start()
    b = await ft.VirtualWorker("pair-b").start()
    actor_a = actor_of(a)
    await a.aclose()
    c = await ft.VirtualWorker("pair-c").start()
    await assert_serves(b, 1.0)
    await b.aclose()
    await assert_serves(c, 2.0)
    await c.aclose()
    assert_closed(actor_a)
    assert not {"pair-a", "pair-b", "pair-c"} & set(in_process_workers())


async def test_a_worker_opened_in_one_task_closes_in_another() -> None:
    opened: list[ft.VirtualWorker] = []
    ready = anyio.Event()
    done = anyio.Event()

    async def opener() -> None:
        opened.append(await ft.VirtualWorker("cross-task").start())
        ready.set()

    async def closer() -> None:
        await ready.wait()
        await opened[0].aclose()
        done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(opener)
            tg.start_soon(closer)
        await done.wait()
    assert opened[0]._actor is None
    assert "cross-task" not in in_process_workers()


async def test_a_worker_opened_here_closes_in_a_child_task() -> None:
    worker = await ft.VirtualWorker("child-closes").start()
    actor = actor_of(worker)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.aclose)
    assert_closed(actor)


async def test_an_exit_stack_closes_what_is_left_after_closing_one_early() -> None:
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(ft.VirtualWorker("stack-0"))
        second = await stack.enter_async_context(ft.VirtualWorker("stack-1"))
        third = await stack.enter_async_context(ft.VirtualWorker("stack-2"))
        actors = [actor_of(w) for w in (first, second, third)]
        await first.aclose()  # before the stack's own close of it, which is then a no-op
        await assert_serves(second, 1.0)
        await assert_serves(third, 2.0)
    for actor in actors:
        assert_closed(actor)


async def test_async_with_closes_the_worker() -> None:
    async with ft.VirtualWorker("with-block") as worker:
        actor = actor_of(worker)
        await assert_serves(worker, 3.0)
    assert_closed(actor)


# -- the actor needs no task ----------------------------------------------------------------------


async def test_posted_batches_run_without_anyone_waiting_for_them() -> None:
    async with ft.VirtualWorker("no-task") as worker:
        actor = actor_of(worker)
        ran = anyio.Event()
        x = ft.send(torch.ones(2), worker)
        for _ in range(10):
            x = x + 1  # no fetch: nothing runs the mailbox on the caller's stack
        worker.client._flush()
        actor.barrier(ran.set)
        with anyio.fail_after(10):
            await ran.wait()
        assert not actor._letters
        (stored,) = (value for _, value in actor.iter_objects())
        assert torch.equal(stored, torch.full((2,), 11.0))
        del stored


async def test_letters_after_a_failing_callback_still_run() -> None:
    loop = asyncio.get_running_loop()
    reported: list[BaseException | None] = []
    loop.set_exception_handler(lambda _, context: reported.append(context.get("exception")))
    try:
        async with ft.VirtualWorker("survives") as worker:
            actor = actor_of(worker)
            ran = anyio.Event()

            def fail() -> None:
                raise ValueError("a barrier's bug")

            actor.barrier(fail)
            actor.barrier(ran.set)
            with anyio.fail_after(10):
                await ran.wait()
            await assert_serves(worker, 4.0)
    finally:
        loop.set_exception_handler(None)
    assert [type(error) for error in reported] == [ValueError]


# -- a close is complete ---------------------------------------------------------------------------


async def test_aclose_stops_the_actor_and_frees_every_object() -> None:
    worker = await ft.VirtualWorker("freed").start()
    actor = actor_of(worker)
    x = ft.send(torch.arange(4.0), worker)
    (stored,) = worker.objects.values()
    stored_ref = weakref.ref(stored)
    del stored
    # A batch queued in the mailbox and not run yet is dropped, with its tensor.
    y = ft.send(torch.ones(3), worker)
    worker.client._flush()
    ((_, queued_batch),) = actor._letters
    assert isinstance(queued_batch, list)
    (queued,) = queued_batch
    assert isinstance(queued, Store)
    queued_ref = weakref.ref(queued.value)
    del queued, queued_batch

    await worker.aclose()
    gc.collect()
    assert_closed(actor)
    assert stored_ref() is None
    assert queued_ref() is None
    with pytest.raises(ft.WorkerUnavailable):
        await x.get()
    with pytest.raises(ft.WorkerUnavailable):
        await y
    assert dict(worker.objects) == {}


async def test_closing_a_worker_fails_other_clients_with_worker_unavailable() -> None:
    worker = await ft.VirtualWorker("shared").start()
    async with ft.connect("memory://shared") as other:
        x = ft.send(torch.ones(2), other)
        assert torch.equal(await x, torch.ones(2))
        await worker.aclose()
        with pytest.raises(ft.WorkerUnavailable):
            await x.get()
        with pytest.raises(ft.WorkerUnavailable):
            await ft.connect("memory://shared")


async def test_aclose_twice_is_a_no_op() -> None:
    worker = await ft.VirtualWorker("twice").start()
    actor = actor_of(worker)
    remote = await ft.connect("memory://twice")
    await remote.aclose()
    await remote.aclose()
    actor.drain()  # the session ends behind what it queued
    assert len(actor._sessions) == 1  # the remote's session ended, the worker's own did not
    await worker.aclose()
    await worker.aclose()
    assert_closed(actor)
    async with ft.VirtualWorker("twice") as again:
        await again.aclose()  # and the block's own close after it does nothing
    async with ft.VirtualWorker("twice"), ft.connect("memory://twice") as remote:
        await remote.aclose()


async def test_a_closed_worker_does_not_start_again() -> None:
    worker = await ft.VirtualWorker("once").start()
    with pytest.raises(ft.FedTensorError, match="already started"):
        await worker.start()
    await worker.aclose()
    with pytest.raises(ft.FedTensorError, match="already started"):
        await worker.start()


class _SlowCloseConnection(Connection):
    """A memory connection whose close waits once, as a network close does."""

    in_process: ClassVar[bool] = True

    def __init__(self, inner: Connection) -> None:
        self._inner = inner

    def send(self, batch: Sequence[Any]) -> None:
        self._inner.send(batch)

    def drain(self) -> None:
        self._inner.drain()

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        await self._inner.aclose()


class _SlowClose(Transport):
    schemes: ClassVar[tuple[str, ...]] = ("slowclose",)

    async def connect(
        self, url: str, sink: ReplySink, *, timeout: float, **options: Any
    ) -> Connection:
        memory_url = url.replace("slowclose://", "memory://")
        return _SlowCloseConnection(await MemoryTransport().connect(memory_url, sink, timeout=1))


async def test_a_close_in_a_cancelled_scope_still_ends_the_session() -> None:
    ft.register_transport(_SlowClose)
    async with ft.VirtualWorker("cancelled-close") as worker:
        actor = actor_of(worker)
        remote = await ft.connect("slowclose://cancelled-close")
        assert len(actor._sessions) == 2
        with anyio.CancelScope() as scope:
            scope.cancel()
            await remote.aclose()
        actor.drain()
        assert len(actor._sessions) == 1


# -- cost and names --------------------------------------------------------------------------------


async def test_one_worker_serves_while_a_thousand_others_are_open() -> None:
    async with contextlib.AsyncExitStack() as stack:
        for i in range(1000):
            await stack.enter_async_context(ft.VirtualWorker(f"crowd-{i}"))
        async with ft.VirtualWorker("crowd-target") as target:
            x = ft.send(torch.zeros(3), target)
            for _ in range(100):
                x = x + 1
            assert torch.equal(await x.get(), torch.full((3,), 100.0))
            assert dict(target.objects) == {}
    assert not any(name.startswith("crowd-") for name in in_process_workers())


async def test_a_worker_reopens_under_the_same_id_after_closing() -> None:
    first = await ft.VirtualWorker("reborn").start()
    old = ft.send(torch.ones(2), first)
    await first.aclose()
    second = await ft.VirtualWorker("reborn").start()
    assert in_process_workers()["reborn"] is actor_of(second)
    assert dict(second.objects) == {}
    await assert_serves(second, 5.0)
    with pytest.raises(ft.WorkerUnavailable):
        await old.get()
    await second.aclose()
    assert "reborn" not in in_process_workers()


async def test_closing_an_older_worker_leaves_the_name_to_the_newer() -> None:
    older = await ft.VirtualWorker("taken-over").start()
    newer = await ft.VirtualWorker("taken-over").start()
    await older.aclose()
    assert in_process_workers()["taken-over"] is actor_of(newer)
    async with ft.connect("memory://taken-over") as remote:
        await assert_serves(remote, 1.0)
    await newer.aclose()


def test_a_blocking_worker_replaced_under_its_id_is_closed() -> None:
    first = sy.VirtualWorker(id="lifecycle-sync")
    actor = actor_of(first)
    x = sy.send(torch.ones(2), first)
    second = sy.VirtualWorker(id="lifecycle-sync")
    assert actor.closed
    assert actor.object_count() == 0
    with pytest.raises(ft.WorkerUnavailable):
        x.get()
    y = sy.send(torch.ones(2), second)
    assert torch.equal((y + y).get(), torch.full((2,), 2.0))
    assert in_process_workers()["lifecycle-sync"] is actor_of(second)


# -- event loops -----------------------------------------------------------------------------------


def test_without_an_asyncio_loop_entry_points_say_fedtensor_needs_asyncio() -> None:
    """What trio (anyio's trio backend included) looks like to fedtensor: no asyncio loop."""
    with pytest.raises(ft.FedTensorError, match="runs on asyncio") as caught:
        require_asyncio("ft.VirtualWorker")
    assert "\n" not in str(caught.value)
    # Driven by hand with no asyncio loop running, as trio drives a coroutine.
    starting = ft.VirtualWorker("no-loop").start()
    with pytest.raises(ft.FedTensorError, match=r"ft\.VirtualWorker needs a running asyncio"):
        starting.send(None)
    starting.close()
    connecting = ft.connect("memory://no-loop").__await__()
    with pytest.raises(ft.FedTensorError, match=r"ft\.connect needs a running asyncio"):
        connecting.send(None)
    connecting.close()
    assert "no-loop" not in in_process_workers()


async def test_a_remote_worker_handle_opens_in_async_with() -> None:
    async with ft.VirtualWorker("lifecycle-remote-target"):
        async with ft.RemoteWorker("memory://lifecycle-remote-target") as handle:
            x = ft.send(torch.tensor([1.0, 2.0]), handle)
            assert torch.equal(await (x * 2).get(), torch.tensor([2.0, 4.0]))
        with pytest.raises(ft.WorkerUnavailable):
            await ft.send(torch.ones(1), handle)
