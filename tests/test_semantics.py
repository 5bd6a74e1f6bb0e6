"""The semantics the runtime promises: value copies, order, errors, GC, allow-list, timeouts."""

from __future__ import annotations

import asyncio
import builtins
import gc
import pathlib

import anyio
import pytest
import torch

import fedtensor as ft
from fedtensor.client.pointer import PointerTensor
from fedtensor.protocol.messages import Call, Ref
from fedtensor.testing import WorkerFactory

pytestmark = pytest.mark.anyio


# -- value semantics -------------------------------------------------------------------------------


async def test_changing_the_local_tensor_after_send_leaves_the_remote_copy(
    ft_worker: ft.WorkerHandle,
) -> None:
    local = torch.zeros(4)
    x = ft.send(local, ft_worker)
    local.add_(5)  # before the send was even flushed
    arg = torch.ones(4)
    y = x + arg
    arg.mul_(100)  # a local argument is copied when the command is made
    assert torch.equal(await x, torch.zeros(4))
    assert torch.equal(await y.get(), torch.ones(4))
    copy = await x
    x.add_(1)  # changing the remote tensor leaves the copy already fetched
    assert torch.equal(copy, torch.zeros(4))
    got = await x.get()
    assert torch.equal(got, torch.ones(4))
    assert torch.equal(local, torch.full((4,), 5.0))


async def test_get_of_a_view_does_not_share_memory_with_the_worker(
    ft_worker: ft.WorkerHandle,
) -> None:
    x = ft.send(torch.zeros(4), ft_worker)
    view = x[:2]
    got = await view.get()
    x.add_(1)
    assert torch.equal(got, torch.zeros(2))
    assert torch.equal(await x.get(), torch.ones(4))


# -- order ----------------------------------------------------------------------------------------


async def test_pipelined_dependent_commands_run_in_order(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.zeros(3), ft_worker)
    for step in range(100):
        x = x * 2 + step  # each command depends on the one before; nothing waits
    expected = torch.zeros(3)
    for step in range(100):
        expected = expected * 2 + step
    assert torch.equal(await x.get(), expected)


# -- errors ---------------------------------------------------------------------------------------


async def test_remote_error_names_the_remote_exception_and_spreads(
    ft_worker: ft.WorkerHandle,
) -> None:
    a = ft.send(torch.ones(2), ft_worker)
    b = ft.send(torch.ones(3), ft_worker)
    bad = a + b
    derived = (bad * 2).sum()
    with pytest.raises(ft.RemoteError, match="size of tensor") as caught:
        await bad
    assert caught.value.remote_type == "RuntimeError"
    assert caught.value.worker == "bob"
    with pytest.raises(ft.RemoteError, match="size of tensor"):
        await derived.get()
    # The worker keeps serving.
    assert torch.equal(await (a + a).get(), torch.full((2,), 2.0))
    del caught


async def test_unknown_object_id(ft_worker: ft.WorkerHandle) -> None:
    ghost = PointerTensor(ft_worker.client, 123_456_789)
    with pytest.raises(ft.ObjectNotFound):
        await ghost
    with pytest.raises(ft.ObjectNotFound):
        await (ghost + 1).get()
    assert torch.equal(await ft.send(torch.ones(1), ft_worker).get(), torch.ones(1))


async def test_pointers_on_two_workers_in_one_op(ft_workers: WorkerFactory) -> None:
    bob, alice = await ft_workers("bob"), await ft_workers("alice")
    x = ft.send(torch.ones(2), bob)
    y = ft.send(torch.ones(2), alice)
    z = x + y
    with pytest.raises(ft.LocationError, match="'bob' and worker 'alice'"):
        await z
    with pytest.raises(ft.LocationError):
        await (z + 1).get()
    assert torch.equal(await (x + x).get(), torch.full((2,), 2.0))


async def test_pointer_used_after_get(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.ones(2), ft_worker)
    await x.get()
    with pytest.raises(ft.PointerReleased):
        await x
    with pytest.raises(ft.PointerReleased):
        await (x + 1)


async def test_error_classes_form_one_tree() -> None:
    for error in (
        ft.RemoteError,
        ft.ForbiddenOperation,
        ft.ObjectNotFound,
        ft.LimitExceeded,
        ft.LocationError,
        ft.PointerReleased,
        ft.ProtocolError,
        ft.WorkerUnavailable,
        ft.TransportNotFound,
        ft.TimeoutError,
    ):
        assert issubclass(error, ft.FedTensorError)
    assert issubclass(ft.TimeoutError, builtins.TimeoutError)
    assert issubclass(ft.ForbiddenOperation, ft.RemoteError)


# -- remote garbage collection ------------------------------------------------------------------


async def test_rebinding_in_a_loop_leaves_one_object(ft_worker: ft.WorkerHandle) -> None:
    x = ft.send(torch.zeros(5), ft_worker)
    for _ in range(1000):
        x = x + 1
    assert len(await ft_worker.object_ids()) == 1
    assert torch.equal(await x, torch.full((5,), 1000.0))
    assert len(await ft_worker.object_ids()) == 1  # awaiting does not free
    await x.get()
    assert await ft_worker.object_ids() == []  # get() does


async def test_dropped_pointers_are_freed(ft_worker: ft.WorkerHandle) -> None:
    pointers = [ft.send(torch.ones(1), ft_worker) for _ in range(10)]
    cycle: list[object] = [pointers[0]]
    cycle.append(cycle)  # a reference cycle: freed by the cycle collector only
    assert len(await ft_worker.object_ids()) == 10
    del pointers
    assert len(await ft_worker.object_ids()) == 1
    del cycle
    gc.collect()
    assert await ft_worker.object_ids() == []


# -- the allow-list ------------------------------------------------------------------------------


def test_allow_list_has_tensor_ops_and_nothing_dangerous() -> None:
    allowed = set(ft.allowed_operations())
    for name in (
        "torch.add",
        "Tensor.sum",
        "Tensor.__add__",
        "torch.nn.functional.relu",
        "Tensor.backward",
        "Tensor.grad",
        "torch.matmul",
    ):
        assert name in allowed, name
    for name in (
        "torch.load",
        "torch.save",
        "torch.from_file",
        "Tensor.storage",
        "Tensor.untyped_storage",
        "Tensor.data_ptr",
        "Tensor.set_",
        "Tensor.__reduce_ex__",
        "Tensor.__setstate__",
        "Tensor.share_memory_",
        "Tensor.new_empty",
        "Tensor.resize_",
        "Tensor.apply_",
        "Tensor.register_hook",
        "Tensor.numpy",
        "Tensor.as_strided",
        "builtins.eval",
        "os.system",
    ):
        assert name not in allowed, name
    for name in allowed:
        assert not any(word in name for word in ("load", "save", "file", "pickle", "storage"))


@pytest.mark.parametrize(
    "op",
    [
        "torch.load",
        "torch.save",
        "Tensor.storage",
        "Tensor.__reduce_ex__",
        "builtins.eval",
        "os.system",
        "Tensor.data_ptr",
        "Tensor.set_",
        "",
    ],
)
async def test_worker_refuses_forbidden_operations(ft_worker: ft.WorkerHandle, op: str) -> None:
    client = ft_worker.client
    x = ft.send(torch.ones(2), ft_worker)
    result_id = client.new_id()
    client.submit(Call(result_id, op, (Ref(x.id_at_location), "/tmp/x"), {}))
    result = PointerTensor(client, result_id)
    with pytest.raises(ft.ForbiddenOperation, match="not allowed"):
        await result
    del result
    assert torch.equal(await (x + 1).get(), torch.full((2,), 2.0))  # still serving


async def test_forbidden_torch_function_is_refused_locally(
    ft_worker: ft.WorkerHandle, tmp_path: pathlib.Path
) -> None:
    x = ft.send(torch.ones(4), ft_worker)
    with pytest.raises(ft.ForbiddenOperation, match="as_strided"):
        torch.as_strided(x, (2,), (1,))  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        x.storage()
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(x, tmp_path / "x.pt")
    assert torch.equal(await x.get(), torch.ones(4))


# -- timeouts and dead workers -------------------------------------------------------------------


@pytest.mark.ft_keep_objects  # the worker's replies are dropped: it cannot be asked
async def test_unanswered_fetch_times_out(ft_virtual_workers: WorkerFactory) -> None:
    worker = await ft_virtual_workers("slow", timeout=0.2)
    x = ft.send(torch.ones(1), worker)
    assert worker._actor is not None
    (session,) = worker._actor._sessions
    session.deliver = lambda replies: None  # replies get lost
    with anyio.fail_after(10):
        with pytest.raises(ft.TimeoutError, match="no answer"):
            await x
        with pytest.raises(builtins.TimeoutError):
            await x.value(timeout=0.05)
    del x


async def test_closed_worker_fails_pending_and_later_awaits() -> None:
    async with ft.VirtualWorker("carol", timeout=30) as carol:
        x = ft.send(torch.ones(1), carol)
        assert carol._actor is not None
        (session,) = carol._actor._sessions
        session.deliver = lambda replies: None
        pending = asyncio.ensure_future(x.value())
        await asyncio.sleep(0)  # let the fetch go out
    with anyio.fail_after(5):
        with pytest.raises(ft.WorkerUnavailable):
            await pending
        with pytest.raises(ft.WorkerUnavailable):
            await (x + 1)


# -- namespaces -----------------------------------------------------------------------------------


async def test_clients_cannot_reach_each_others_objects(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob = await ft_virtual_workers("bob")
    mine = ft.send(torch.ones(2), bob)
    async with ft.connect("memory://bob") as other:
        guess = PointerTensor(other.client, mine.id_at_location)
        with pytest.raises(ft.ObjectNotFound):
            await guess
        with pytest.raises(ft.ObjectNotFound):
            await guess.get()
        theirs = ft.send(torch.zeros(1), other)
        assert torch.equal(await theirs, torch.zeros(1))
        assert len(bob.objects) == 2  # the store holds both namespaces
        assert await other.object_ids() == [theirs.id_at_location]
        del theirs, guess
    assert len(bob.objects) == 1  # the other client's objects went with it
    assert torch.equal(await mine.get(), torch.ones(2))


# -- backpressure ----------------------------------------------------------------------------------


async def test_a_burst_beyond_the_threshold_is_run_by_the_caller(
    ft_virtual_workers: WorkerFactory,
) -> None:
    from fedtensor.client.engine import CALLER_RUNS_THRESHOLD

    ft_worker = await ft_virtual_workers("bob")
    assert ft_worker._actor is not None
    x = ft.send(torch.zeros(1), ft_worker)
    for _ in range(CALLER_RUNS_THRESHOLD // 4):  # a command and a release each
        x = x + 1
    # Nothing has yielded to the event loop, so the worker has run nothing yet...
    assert ft_worker._actor.object_count() == 0
    for _ in range(CALLER_RUNS_THRESHOLD):
        x = x + 1
    # ...until the queue passed the threshold and the caller ran it.
    assert ft_worker._actor.object_count() >= 1
    expected = CALLER_RUNS_THRESHOLD // 4 + CALLER_RUNS_THRESHOLD
    assert torch.equal(await x.get(), torch.full((1,), float(expected)))


async def test_get_hands_over_the_workers_tensor_without_a_copy() -> None:
    # In-memory objects path only: an encoded connection copies by design.
    async with ft.VirtualWorker("dave", encode=False) as dave:
        x = ft.send(torch.arange(1000.0), dave)
        (stored,) = dave.objects.values()
        address = stored.data_ptr()
        del stored
        got = await x.get()
        assert got.data_ptr() == address
        # A tensor whose memory a remaining object still views is copied instead.
        y = ft.send(torch.arange(4.0), dave)
        view = y[:2]
        address = dave.objects[y.id_at_location].data_ptr()
        got = await y.get()
        assert got.data_ptr() != address
        del view
