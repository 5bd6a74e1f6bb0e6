"""The blocking API (`fedtensor.sync`): hook, workers, pointers, training, errors, shutdown.

test_seed runs the seed notebook through it cell by cell; these tests check what the
notebook only touches on. Each test names its workers apart: a blocking worker of the same
id replaces the one before it.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.testing import WorkerProcess


@pytest.fixture
def hook() -> Iterator[sy.TorchHook]:
    hook = sy.TorchHook(torch)
    yield hook
    hook.unhook()


def _data(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 6, generator=generator), torch.randint(
        0, 3, (count,), generator=generator
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


# -- the hook -------------------------------------------------------------------------------------


def test_the_hook_adds_tensor_send_and_unhook_takes_it_away() -> None:
    assert not hasattr(torch.Tensor, "send")  # nothing is patched on import
    hook = sy.TorchHook(torch)
    try:
        assert hook.local_worker is ft.local_worker()
        bob = sy.VirtualWorker(hook, id="sync-hook")
        x = torch.tensor([1.0, 2.0]).send(bob)  # type: ignore[attr-defined]
        assert x.location is bob
        assert torch.equal(x.get(), torch.tensor([1.0, 2.0]))
    finally:
        hook.unhook()
    assert not hasattr(torch.Tensor, "send")
    hook.unhook()  # a second time: nothing to do


def test_unhook_leaves_a_send_that_is_not_its_own() -> None:
    hook = sy.TorchHook(torch)

    def theirs(self: torch.Tensor) -> str:
        return "theirs"

    torch.Tensor.send = theirs  # type: ignore[attr-defined]
    try:
        hook.unhook()
        assert torch.ones(1).send() == "theirs"  # type: ignore[attr-defined]
    finally:
        del torch.Tensor.send  # type: ignore[attr-defined]


# -- workers, pointers, values --------------------------------------------------------------------


def test_a_blocking_worker_shows_its_objects_as_of_every_command_sent(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="sync-objects")
    x = torch.arange(3.0).send(bob)  # type: ignore[attr-defined]
    y = x * 2  # queued, not awaited: reading the objects runs it first
    objects = bob.objects
    assert set(objects) == {x.id_at_location, y.id_at_location}
    assert torch.equal(objects[y.id_at_location], torch.arange(3.0) * 2)
    with pytest.raises(TypeError):
        objects[12345] = torch.ones(1)  # type: ignore[index]
    del y
    gc.collect()
    assert list(bob.objects) == [x.id_at_location]  # the dropped pointer freed its object
    assert torch.equal(x.value(), torch.arange(3.0))  # value() leaves it there
    assert list(bob.objects) == [x.id_at_location]
    assert torch.equal(x.get(), torch.arange(3.0))  # get() takes it
    assert dict(bob.objects) == {}
    with pytest.raises(ft.PointerReleased):
        x.get()


def test_a_pipelined_chain_blocks_only_for_its_value() -> None:
    bob = sy.VirtualWorker(id="sync-chain")
    x = sy.send(torch.zeros(2), bob)
    for _ in range(200):
        x = x + 1  # each a command queued at once, the last one's object alone kept
    assert torch.equal(x.get(), torch.full((2,), 200.0))
    gc.collect()
    assert dict(bob.objects) == {}


def test_multi_pointers_pair_by_worker_and_sum_results() -> None:
    workers = [sy.VirtualWorker(id=f"sync-multi-{i}") for i in range(3)]
    m = sy.send(torch.tensor([1, 2, 3]), *workers)
    assert [child.location for child in m.children] == workers
    doubled = m * 2  # once per worker
    assert [t.tolist() for t in doubled.get()] == [[2, 4, 6]] * 3
    assert torch.equal(m.get(sum_results=True), torch.tensor([3, 6, 9]))
    assert all(dict(worker.objects) == {} for worker in workers)


def test_remote_backward_fills_the_remote_grad(hook: sy.TorchHook) -> None:
    bob = sy.VirtualWorker(hook, id="sync-grad")
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True).send(bob)  # type: ignore[attr-defined]
    (x * x).sum().backward()  # runs on bob
    assert torch.equal(x.grad.value(), torch.tensor([2.0, -4.0, 6.0]))  # d(x^2)/dx, a pointer
    got = x.get()
    assert got.requires_grad
    assert torch.equal(got.grad, torch.tensor([2.0, -4.0, 6.0]))


# -- training --------------------------------------------------------------------------------------


def test_blocking_fit_on_a_held_data_set_equals_the_async_fit() -> None:
    data = _data(24)
    bob = sy.VirtualWorker(id="sync-fit", datasets={"tiny": data})
    federated = sy.load_dataset([bob], "tiny")
    assert federated.sizes() == {"sync-fit": 24}
    assert torch.equal(federated.shards[0].targets.value(), data[1])
    model = _model()
    history = sy.fit(model, federated, rounds=2, batch_size=8, lr=0.3, seed=3, progress=False)
    assert [m.completed for m in history] == [("sync-fit",)] * 2
    del federated

    async def the_async_twin() -> nn.Module:
        async with ft.VirtualWorker("async-fit", datasets={"tiny": data}) as alice:
            twin = _model()
            await ft.fit(
                twin, await ft.load_dataset([alice], "tiny"), rounds=2, batch_size=8, lr=0.3,
                seed=3, progress=False,
            )  # fmt: skip
            return twin

    twin = asyncio.run(the_async_twin())
    assert not torch.equal(model[0].weight, _model()[0].weight)  # it trained
    for key, value in twin.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    gc.collect()
    assert dict(bob.objects) == {}


# -- errors ----------------------------------------------------------------------------------------


def test_errors_are_fedtensors_own() -> None:
    bob, alice = sy.VirtualWorker(id="sync-err-bob"), sy.VirtualWorker(id="sync-err-alice")
    x = sy.send(torch.ones(2, 3), bob)
    with pytest.raises(ft.RemoteError) as failed:
        (x @ x).get()  # (2, 3) @ (2, 3): the worker's torch raises
    assert failed.value.remote_type == "RuntimeError"
    with pytest.raises(ft.ForbiddenOperation):
        torch.as_strided(x, (2,), (1,))  # type: ignore[arg-type]
    mixed = x + sy.send(torch.ones(2, 3), alice)  # a pointer at once, failing when used
    with pytest.raises(ft.LocationError):
        mixed.get()
    with pytest.raises(ft.RemoteError, match="holds no data set 'missing'"):
        sy.load_dataset([bob], "missing")
    assert torch.equal((x + 1).get(), torch.full((2, 3), 2.0))  # bob serves on


def test_connect_errors_are_fedtensors_own(
    ft_worker_processes: Callable[..., WorkerProcess],
) -> None:
    with socket.socket() as unused:  # bound but not listening: the connection is refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        with pytest.raises(ft.WorkerUnavailable, match="cannot reach"):
            sy.connect(f"ws://127.0.0.1:{port}", token="t", timeout=10)
    process = ft_worker_processes("sync-auth")
    with pytest.raises(ft.AuthenticationFailed):
        sy.connect(process.url, token="wrong", timeout=30)
    worker = sy.connect(process.url, token=process.token, timeout=30)
    assert torch.equal((sy.send(torch.ones(2), worker) * 3).get(), torch.full((2,), 3.0))


# -- shutdown --------------------------------------------------------------------------------------


def _runtime_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "fedtensor-runtime"]


def test_shutdown_closes_every_blocking_worker_and_a_new_one_starts_afresh() -> None:
    bob = sy.VirtualWorker(id="sync-shutdown")
    x = sy.send(torch.ones(2), bob)
    assert _runtime_threads()
    sy.shutdown()
    assert _runtime_threads() == []  # the background loop's thread has ended
    with pytest.raises(ft.WorkerUnavailable):
        x.get()
    assert dict(bob.objects) == {}
    sy.shutdown()  # a second time: nothing to do
    again = sy.VirtualWorker(id="sync-shutdown")  # a new runtime, on first use
    assert torch.equal((sy.send(torch.ones(2), again) + 1).get(), torch.full((2,), 2.0))
