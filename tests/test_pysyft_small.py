"""Small gaps a PySyft 0.2 user hits (issue 9): devices as arguments, the exceptions in
``fedtensor.sync``, ``worker._objects.clear()`` and ``clear_objects()``, and a
``backward()`` that cannot work refused at once.

The async tests run over every transport (tests/conftest.py); the blocking ones name
their workers apart, since a blocking worker of the same id replaces the one before it.
"""

from __future__ import annotations

import gc

import pytest
import torch

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.client.pointer import MAX_UNCHECKED
from fedtensor.testing import WorkerFactory

# -- devices ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_device_argument_travels_as_its_name(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.arange(3.0), ft_worker)
    moved = x.to(torch.device("cpu"))
    assert torch.equal(await moved.get(), torch.arange(3.0))
    as_keyword = x.to(device=torch.device("cpu"), dtype=torch.float64)
    got = await as_keyword.get()
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.arange(3.0, dtype=torch.float64))
    if not torch.cuda.is_available():
        # The worker's torch refuses a device it lacks, as torch would locally.
        with pytest.raises(ft.RemoteError) as refused:
            await x.to(torch.device("cuda")).get()
        assert refused.value.remote_type in ("AssertionError", "RuntimeError")
    del x


# -- the exceptions in fedtensor.sync --------------------------------------------------------------


def test_sync_exports_every_public_exception() -> None:
    exceptions = [
        name
        for name in ft.__all__
        if isinstance(getattr(ft, name), type) and issubclass(getattr(ft, name), BaseException)
    ]
    assert "FedTensorError" in exceptions
    assert "RemoteError" in exceptions
    for name in exceptions:
        assert getattr(sy, name) is getattr(ft, name), name  # the same classes, not copies
    assert set(exceptions) <= set(sy.__all__)
    assert sy.__all__ == sorted(sy.__all__)
    assert all(hasattr(sy, name) for name in sy.__all__)


# -- clearing a worker's objects -------------------------------------------------------------------


@pytest.mark.anyio
async def test_clear_objects_frees_what_this_client_holds(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.ones(2), ft_worker)
    y = x * 2  # queued: the clear runs behind it, so it frees its result too
    assert await ft_worker.clear_objects() is ft_worker
    assert await ft_worker.object_ids() == []
    with pytest.raises(ft.ObjectNotFound):
        await y
    z = ft.send(torch.zeros(1), ft_worker)  # the worker serves on
    assert torch.equal(await z.get(), torch.zeros(1))
    del x, y


@pytest.mark.anyio
async def test_clear_objects_leaves_other_clients_objects(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob = await ft_virtual_workers("bob")
    mine = ft.send(torch.ones(2), bob)
    async with ft.connect("memory://bob") as other:
        theirs = ft.send(torch.zeros(2), other)
        await other.clear_objects()
        assert await other.object_ids() == []
        assert await bob.object_ids() == [mine.id_at_location]
        assert torch.equal(await mine.get(), torch.ones(2))
        del theirs


@pytest.mark.anyio
async def test_an_async_snapshot_refuses_every_mutation(ft_virtual_workers: WorkerFactory) -> None:
    bob = await ft_virtual_workers("bob")
    x = ft.send(torch.ones(2), bob)
    objects = bob.objects
    with pytest.raises(TypeError, match="clear_objects"):
        objects.clear()
    with pytest.raises(TypeError, match="read-only"):
        objects[x.id_at_location] = torch.zeros(2)
    with pytest.raises(TypeError, match="read-only"):
        del objects[x.id_at_location]
    with pytest.raises(TypeError, match="read-only"):
        objects.pop(x.id_at_location)
    with pytest.raises(TypeError, match="read-only"):
        objects.update({})
    assert list(bob.objects) == [x.id_at_location]  # nothing was freed
    assert torch.equal(await x.get(), torch.ones(2))


def test_blocking_objects_clear_frees_this_clients_objects() -> None:
    bob = sy.VirtualWorker(id="pysyft-clear")
    x = sy.send(torch.ones(2), bob)
    y = x + 1  # queued, not awaited
    objects = bob._objects
    assert set(objects) == {x.id_at_location, y.id_at_location}  # reading it ran y first
    objects.clear()  # type: ignore[attr-defined]
    assert dict(objects) == {}
    assert dict(bob._objects) == {}
    with pytest.raises(ft.ObjectNotFound):
        y.get()
    with pytest.raises(TypeError, match="read-only"):
        bob.objects[1] = torch.ones(1)  # type: ignore[index]
    z = sy.send(torch.zeros(3), bob)
    assert bob.clear_objects() is bob
    assert dict(bob.objects) == {}
    with pytest.raises(ft.ObjectNotFound):
        z.value()
    del x, y, z
    gc.collect()


def test_blocking_remote_worker_clears_its_own_objects_only() -> None:
    bob = sy.VirtualWorker(id="pysyft-clear-remote")
    mine = sy.send(torch.ones(2), bob)
    other = sy.connect("memory://pysyft-clear-remote")
    theirs = sy.send(torch.zeros(2), other)
    doubled = theirs * 2
    assert set(other._objects) == {theirs.id_at_location, doubled.id_at_location}
    other._objects.clear()  # type: ignore[attr-defined]
    assert dict(other._objects) == {}
    assert set(bob.objects) == {mine.id_at_location}  # bob's own client keeps its objects
    theirs = sy.send(torch.zeros(2), other)
    assert other.clear_objects() is other
    assert dict(other.objects) == {}
    assert torch.equal(mine.get(), torch.ones(2))
    del theirs, doubled


# -- backward() without a gradient -----------------------------------------------------------------


@pytest.mark.anyio
async def test_backward_of_a_known_non_scalar_is_refused_at_once(
    ft_worker: ft.WorkerHandle,
) -> None:
    x = ft.send(torch.ones(3, requires_grad=True), ft_worker)
    with pytest.raises(ft.RemoteError, match="only for scalar outputs") as refused:
        x.backward()
    assert refused.value.remote_type == "RuntimeError"  # what torch raises
    assert refused.value.worker == ft_worker.id
    assert await ft_worker.object_ids() == [x.id_at_location]  # nothing was sent
    # A result's shape is known too (inferred locally, fedtensor.client.meta).
    doubled = x * 2
    with pytest.raises(ft.RemoteError, match="only for scalar outputs"):
        doubled.backward()
    # With a gradient, or from one element, it runs on the worker.
    doubled.backward(torch.ones(3))
    assert torch.equal(await x.grad.get(), torch.full((3,), 2.0))
    one = ft.send(torch.ones(1, requires_grad=True), ft_worker)
    (one[one > 0] * 5).backward()  # shape unknown locally: sent; one element, so it works
    one.backward()  # shape (1,) known: one element, sent
    assert torch.equal(await one.grad.get(), torch.full((1,), 6.0))
    del x, doubled, one


@pytest.mark.anyio
async def test_backward_of_an_unknown_shape_fails_at_the_next_await(
    ft_worker: ft.WorkerHandle,
) -> None:
    x = ft.send(torch.ones(3, requires_grad=True), ft_worker)
    y = ft.send(torch.ones(2), ft_worker)
    (x[x > 0] * 2).backward()  # the shape is unknown here: sent, and it fails on the worker
    with pytest.raises(ft.RemoteError, match="scalar outputs") as failed:
        await y.get()  # any pointer to that worker
    assert failed.value.remote_type == "RuntimeError"
    assert torch.equal(await y.get(), torch.ones(2))  # reported once, before y was taken
    result = (x[x > 0] * 2).backward()
    with pytest.raises(ft.RemoteError, match="scalar outputs"):
        await result  # its own pointer reports it too
    assert torch.equal(await x, torch.ones(3))
    (x[x > 0] * 2).backward()
    await ft_worker.clear_objects()  # frees the result: nothing is left to check
    z = ft.send(torch.zeros(1), ft_worker)
    assert torch.equal(await z.get(), torch.zeros(1))
    del x, result


@pytest.mark.anyio
async def test_unawaited_backward_results_are_bounded(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.ones(3, requires_grad=True), ft_worker)
    for _ in range(MAX_UNCHECKED + 10):
        (x * 2).sum().backward()  # succeeds; its result is kept until the next await
    gc.collect()
    assert len(await ft_worker.object_ids()) == 1 + MAX_UNCHECKED
    assert torch.equal(await x.grad.get(), torch.full((3,), 2.0 * (MAX_UNCHECKED + 10)))
    gc.collect()
    assert await ft_worker.object_ids() == [x.id_at_location]  # checked, then released
    del x


def test_blocking_backward_of_an_unknown_shape_fails_at_the_next_get() -> None:
    bob = sy.VirtualWorker(id="pysyft-backward")
    x = sy.send(torch.ones(3, requires_grad=True), bob)
    with pytest.raises(ft.RemoteError, match="scalar outputs"):
        x.backward()  # known shape: at once
    (x[x > 0] * 2).backward()  # from this thread; the check hops onto the runtime's loop
    with pytest.raises(ft.RemoteError, match="scalar outputs"):
        x.value()
    alice = sy.VirtualWorker(id="pysyft-backward-alice")
    with pytest.raises(ft.LocationError):
        (x * 2).backward(sy.send(torch.ones(3), alice))  # known here: raised at once
    assert torch.equal(x.get(), torch.ones(3))


def test_blocking_tensors_shows_only_the_tensors_among_the_objects() -> None:
    # PySyft 0.2's ``bob._tensors``: alice holds a pointer record (not a tensor) and
    # bob the tensor it points to.
    bob = sy.VirtualWorker(id="pysyft-tensors-bob")
    alice = sy.VirtualWorker(id="pysyft-tensors-alice")
    x = sy.send(torch.tensor([1.0, 2.0]), bob)
    chained = x.send(alice)
    assert len(alice._objects) == 1
    assert dict(alice._tensors) == {}
    held = dict(bob._tensors)
    assert list(held) == [x.id_at_location]
    assert torch.equal(held[x.id_at_location], torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="read-only"):
        bob._tensors[1] = torch.ones(1)  # type: ignore[index]
    assert torch.equal(chained.get().get(), torch.tensor([1.0, 2.0]))
    del x, chained
    gc.collect()
