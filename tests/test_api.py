"""The async API contract: sending, pipelined operations, fetching, multi-pointers, autograd."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fedtensor as ft
from fedtensor.testing import WorkerFactory

pytestmark = pytest.mark.anyio


async def test_send_returns_pointer_with_local_metadata(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.tensor([1, 2, 3, 4, 5]), ft_worker)
    assert isinstance(x, ft.PointerTensor)
    assert x.location is ft_worker
    assert x.owner is ft.local_worker()
    assert x.shape == torch.Size([5])
    assert x.dtype == torch.int64
    assert isinstance(x.id_at_location, int)
    assert isinstance(x.id, int)
    assert re.fullmatch(rf"<PointerTensor me:{x.id} -> bob:{x.id_at_location}>", repr(x))
    assert await ft_worker.object_ids() == [x.id_at_location]
    assert torch.equal(await x.get(), torch.tensor([1, 2, 3, 4, 5]))
    assert await ft_worker.object_ids() == []


async def test_arithmetic_and_torch_functions(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.tensor([1, 2, 3, 4, 5]), ft_worker)
    y = ft.send(torch.ones(5, dtype=torch.long), ft_worker)
    z = x + y
    w = torch.add(x, y)
    assert isinstance(z, ft.PointerTensor)
    assert isinstance(w, ft.PointerTensor)
    assert torch.equal(await z, torch.tensor([2, 3, 4, 5, 6]))
    assert torch.equal(await w.get(), torch.tensor([2, 3, 4, 5, 6]))
    assert torch.equal(await (2 * x - y).get(), torch.tensor([1, 3, 5, 7, 9]))
    assert torch.equal(await (x @ y).get(), torch.tensor(15))
    assert torch.equal(await (-x).get(), -torch.tensor([1, 2, 3, 4, 5]))
    assert torch.equal(await (x > 2).get(), torch.tensor([False, False, True, True, True]))
    assert torch.equal(await (x == y).get(), torch.tensor([True, False, False, False, False]))


async def test_methods_functional_and_indexing(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.arange(6.0), ft_worker)
    assert torch.equal(await x.view(2, 3).sum(dim=1).get(), torch.tensor([3.0, 12.0]))
    assert torch.equal(await F.relu(x - 2).get(), torch.tensor([0.0, 0, 0, 1, 2, 3]))
    assert torch.equal(await x[1:3].get(), torch.tensor([1.0, 2.0]))
    assert torch.equal(await x[[0, 5]].get(), torch.tensor([0.0, 5.0]))
    assert torch.equal(await torch.cat([x, x]).get(), torch.cat([torch.arange(6.0)] * 2))
    values, indices = torch.max(x.view(2, 3), dim=1)  # one pointer per output
    assert torch.equal(await values.get(), torch.tensor([2.0, 5.0]))
    assert torch.equal(await indices.get(), torch.tensor([2, 2]))
    assert await x.sum().item().get() == 15.0
    # A local tensor as an argument travels along with the command.
    assert torch.equal(await (x + torch.ones(6)).get(), torch.arange(1.0, 7.0))
    x[0] = 100.0
    assert (await x.get())[0].item() == 100.0


async def test_in_place_operations_change_the_remote_tensor(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.zeros(3), ft_worker)
    x.add_(1)
    x += 1
    assert torch.equal(await x.get(), torch.full((3,), 2.0))


async def test_multi_pointer_send_get_and_sum(ft_workers: WorkerFactory) -> None:
    bob, alice = await ft_workers("bob"), await ft_workers("alice")
    m = ft.send(torch.arange(5), bob, alice)
    assert isinstance(m, ft.MultiPointerTensor)
    assert m.location == [bob, alice]
    assert len(await bob.object_ids()) == 1
    assert len(await alice.object_ids()) == 1
    copies = await m
    assert [t.tolist() for t in copies] == [[0, 1, 2, 3, 4]] * 2
    values = await m.get()
    assert [t.tolist() for t in values] == [[0, 1, 2, 3, 4]] * 2
    assert await bob.object_ids() == []
    assert await alice.object_ids() == []
    m = ft.send(torch.arange(5), bob, alice)
    assert torch.equal(await (m * 2).get(sum_results=True), torch.arange(5) * 4)


async def test_multi_pointer_operations_pair_by_worker(ft_workers: WorkerFactory) -> None:
    bob, alice = await ft_workers("bob"), await ft_workers("alice")
    a = ft.send(torch.ones(2), bob, alice)
    b = ft.send(torch.full((2,), 3.0), bob, alice)
    assert [t.tolist() for t in await torch.add(a, b).get()] == [[4.0, 4.0]] * 2
    c = ft.send(torch.ones(2), bob)
    with pytest.raises(ft.LocationError):
        torch.add(a, ft.MultiPointerTensor([c]))
    del a, b, c


async def test_fetch_soon_goes_with_the_commands_queued_before_it(
    ft_worker: ft.WorkerHandle, frames_sent: Callable[..., dict[str, list[list[str]]]]
) -> None:
    x = ft.send(torch.arange(4.0), ft_worker)
    assert torch.equal(await x.value(), torch.arange(4.0))
    client = ft_worker.client
    frames = frames_sent([ft_worker])[ft_worker.id]
    answer = (x * 2).fetch_soon(free=True)
    assert torch.equal(await answer, torch.arange(4.0) * 2)
    assert frames[0] == ["Call", "Fetch"]  # one frame: the command, then its fetch
    with pytest.raises(ft.RemoteError, match="invalid for input of size 4"):
        await x.reshape(5).fetch_soon()
    given_up = (x + 1).fetch_soon()
    given_up.cancel()  # its reply, if it comes, is dropped
    assert torch.equal(await x.value(), torch.arange(4.0))
    assert client._pending == {}  # nothing left waiting
    with pytest.raises(ft.FedTensorError, match="client's event loop, not another thread"):
        await asyncio.to_thread(x.fetch_soon, free=True)
    assert torch.equal(await x, torch.arange(4.0))  # refused: the pointer still holds it


async def test_remote_autograd(ft_worker: ft.WorkerHandle) -> None:
    a = ft.send(torch.tensor([1.0, 2, 3], requires_grad=True), ft_worker)
    (a * 2).sum().backward()
    got = await a.get()
    assert got.requires_grad
    assert torch.equal(got.grad, torch.tensor([2.0, 2.0, 2.0]))


async def test_remote_grad_attribute_is_a_pointer(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.tensor([1.0, 2.0], requires_grad=True), ft_worker)
    y = ft.send(torch.tensor([3.0, 4.0], requires_grad=True), ft_worker)
    (x * y).sum().backward()
    grad = x.grad
    assert isinstance(grad, ft.PointerTensor)
    assert torch.equal(await grad.get(), torch.tensor([3.0, 4.0]))
    assert torch.equal(await y.grad.get(), torch.tensor([1.0, 2.0]))
    # A non-leaf result comes back as a leaf that still says it requires grad.
    z = await (x * 2).get()
    assert z.requires_grad
    assert z.is_leaf
    del x, y


async def test_pointers_refuse_implicit_round_trips(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.ones(1), ft_worker)
    with pytest.raises(TypeError, match="round trip"):
        bool(x)
    with pytest.raises(AttributeError, match="not an allowed"):
        _ = x.no_such_method


async def test_connect_by_url_gives_a_second_client(ft_virtual_workers: WorkerFactory) -> None:
    await ft_virtual_workers("bob")
    async with ft.connect("memory://bob") as other:
        x = ft.send(torch.ones(2), other)
        assert x.location is other
        assert torch.equal(await (x + 1).get(), torch.full((2,), 2.0))
    with pytest.raises(ft.TransportNotFound):
        await ft.connect("nosuchscheme://x")
    with pytest.raises(ft.WorkerUnavailable):
        await ft.connect("memory://nobody")


async def test_arguments_outside_the_wire_grammar_are_refused_at_once(
    ft_worker: ft.WorkerHandle,
) -> None:
    x = ft.send(torch.ones(2), ft_worker)
    with pytest.raises(TypeError, match="cannot be sent to a worker"):
        x + object()
    with pytest.raises(TypeError, match="Generator cannot be sent"):
        x.add(torch.Generator())
    assert torch.equal(await (x + 1).get(), torch.full((2,), 2.0))  # nothing was queued
    del x
