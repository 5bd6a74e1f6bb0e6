"""The seed notebook, cell by cell: blocking facade (as written) and its async twin."""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import Iterator

import pytest
import torch as th

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.testing import WorkerFactory


@pytest.fixture
def hook() -> Iterator[sy.TorchHook]:
    hook = sy.TorchHook(th)
    yield hook
    hook.unhook()
    assert not hasattr(th.Tensor, "send")


def test_seed_notebook_blocking(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="bob")
    assert dict(bob._objects) == {}

    x = th.tensor([1, 2, 3, 4, 5])
    x = x.send(bob)
    (stored,) = bob._objects.values()
    assert th.equal(stored, th.tensor([1, 2, 3, 4, 5]))
    assert list(bob._objects) == [x.id_at_location]
    assert x.location is bob
    assert repr(x.location) == "<VirtualWorker id:bob #objects:1>"
    assert isinstance(x.id_at_location, int)
    assert isinstance(x.id, int)
    assert x.owner is hook.local_worker is ft.local_worker()
    assert th.equal(x.get(), th.tensor([1, 2, 3, 4, 5]))
    assert dict(bob._objects) == {}

    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    x = th.tensor([1, 2, 3, 4, 5]).send(bob, alice)
    assert re.search(r"-> bob:\d+>.*-> alice:\d+>", repr(x), re.S)
    assert len(bob._objects) == 1
    assert len(alice._objects) == 1
    assert [t.tolist() for t in x.get()] == [[1, 2, 3, 4, 5]] * 2
    assert dict(bob._objects) == {}
    assert dict(alice._objects) == {}
    x = th.tensor([1, 2, 3, 4, 5]).send(bob, alice)
    assert th.equal(x.get(sum_results=True), th.tensor([2, 4, 6, 8, 10]))

    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    y = th.tensor([1, 1, 1, 1, 1]).send(bob)
    z = x + y
    assert re.fullmatch(r"<SyncPointerTensor me:\d+ -> bob:\d+>", repr(z))
    assert th.equal(z.get(), th.tensor([2, 3, 4, 5, 6]))
    z = th.add(x, y)
    assert th.equal(z.get(), th.tensor([2, 3, 4, 5, 6]))

    x = th.tensor([1.0, 2, 3, 4, 5], requires_grad=True).send(bob)
    y = th.tensor([1.0, 1, 1, 1, 1], requires_grad=True).send(bob)
    z = (x + y).sum()
    z.backward()
    x = x.get()
    assert x.requires_grad
    assert th.equal(x, th.tensor([1.0, 2, 3, 4, 5]))
    assert th.equal(x.grad, th.tensor([1.0, 1, 1, 1, 1]))

    del y, z
    gc.collect()
    assert dict(bob._objects) == {}
    assert dict(alice._objects) == {}


def test_blocking_facade_inside_a_running_event_loop(hook: sy.TorchHook) -> None:
    """What Jupyter does: user code runs while an event loop runs on the same thread."""
    bob = sy.VirtualWorker(hook, id="nb-bob")

    async def cell() -> th.Tensor:
        x = th.tensor([1.0, 2.0]).send(bob)
        assert th.equal(await x, th.tensor([1.0, 2.0]))  # awaiting a blocking pointer works too
        return (x * 3).get()  # type: ignore[no-any-return]

    assert th.equal(asyncio.run(cell()), th.tensor([3.0, 6.0]))
    gc.collect()
    assert dict(bob._objects) == {}


def test_blocking_get_times_out(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="mute", timeout=0.2)
    x = th.ones(1).send(bob)
    assert bob._actor is not None
    (session,) = bob._actor._sessions
    session.deliver = lambda replies: None
    with pytest.raises(ft.TimeoutError):
        x.get()


@pytest.mark.anyio
async def test_seed_notebook_async(ft_virtual_workers: WorkerFactory) -> None:
    bob = await ft_virtual_workers("bob")
    assert dict(bob.objects) == {}
    x = ft.send(th.tensor([1, 2, 3, 4, 5]), bob)
    assert list(bob._objects) == [x.id_at_location]
    assert repr(x.location) == "<VirtualWorker id:bob #objects:1>"
    assert x.owner is ft.local_worker()
    assert th.equal(await x.get(), th.tensor([1, 2, 3, 4, 5]))
    assert dict(bob.objects) == {}

    alice = await ft_virtual_workers("alice")
    x = ft.send(th.tensor([1, 2, 3, 4, 5]), bob, alice)
    assert len(bob.objects) == len(alice.objects) == 1
    assert [t.tolist() for t in await x.get()] == [[1, 2, 3, 4, 5]] * 2
    assert len(bob.objects) == len(alice.objects) == 0
    x = ft.send(th.tensor([1, 2, 3, 4, 5]), bob, alice)
    assert th.equal(await x.get(sum_results=True), th.tensor([2, 4, 6, 8, 10]))

    x = ft.send(th.tensor([1, 2, 3, 4, 5]), bob)
    y = ft.send(th.tensor([1, 1, 1, 1, 1]), bob)
    assert th.equal(await (x + y).get(), th.tensor([2, 3, 4, 5, 6]))
    assert th.equal(await th.add(x, y).get(), th.tensor([2, 3, 4, 5, 6]))

    x = ft.send(th.tensor([1.0, 2, 3, 4, 5], requires_grad=True), bob)
    y = ft.send(th.tensor([1.0, 1, 1, 1, 1], requires_grad=True), bob)
    (x + y).sum().backward()
    got = await x.get()
    assert th.equal(got.grad, th.tensor([1.0, 1, 1, 1, 1]))
    del y
