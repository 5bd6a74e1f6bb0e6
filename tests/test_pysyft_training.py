"""PySyft's training loop on pointers (issue 9): remote models and ``torch.optim``,
``torch.no_grad()`` and ``torch.autograd.grad`` on the worker, multi-output operations as
tuples of pointers, ``len``/iteration/unpacking, and shapes known without a round trip.

The async tests run over every transport (tests/conftest.py): in-memory objects, encoded
frames, and websockets to a worker process. Each training loop is compared with the same
loop run locally, and counts the client's round trips (questions awaited: fetches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.client.engine import Client
from fedtensor.client.modules import RemoteGradient, RemoteParameter
from fedtensor.client.pointer import call_on
from fedtensor.testing import WorkerProcess

# PySyft 0.2's Part 2 tutorial ("Intro to Federated Learning"): a toy data set.
DATA = torch.tensor([[1.0, 1], [0, 1], [1, 0], [0, 0]])
TARGET = torch.tensor([[1.0], [1], [0], [0]])
ITERATIONS = 20


@contextmanager
def round_trips(worker: ft.WorkerHandle) -> Iterator[list[int]]:
    """Count the questions (fetches, listings) the client awaits from ``worker``."""
    client: Client = worker.client
    original = client._ask
    count = [0]

    async def counting(make: Any, timeout: float | None) -> Any:
        count[0] += 1
        return await original(make, timeout)

    client._ask = counting  # type: ignore[method-assign]
    try:
        yield count
    finally:
        del client._ask


def _model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(2, 1)


def _local_training(make_optimizer: Callable[[Any], torch.optim.Optimizer]) -> torch.nn.Module:
    model = _model()
    optimizer = make_optimizer(model.parameters())
    for _ in range(ITERATIONS):
        optimizer.zero_grad()
        loss = ((model(DATA) - TARGET) ** 2).sum()
        loss.backward()
        optimizer.step()
    return model


# -- the training loop ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("optimizer_first", [True, False], ids=["optimizer-first", "send-first"])
async def test_part2_loop_with_torch_optim_sgd_equals_local(
    ft_worker: ft.WorkerHandle, optimizer_first: bool
) -> None:
    model = _model()
    if optimizer_first:  # as PySyft's Part 2 does: the optimizer sees the local parameters
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        assert ft.send(model, ft_worker) is model
    else:
        ft.send(model, ft_worker)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert isinstance(model.weight, RemoteParameter)
    assert model.weight.location is ft_worker
    assert model.weight.shape == (1, 2)  # known locally
    data, target = ft.send(DATA, ft_worker), ft.send(TARGET, ft_worker)
    losses = []
    with round_trips(ft_worker) as asked:
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            pred = model(data)
            loss = ((pred - target) ** 2).sum()
            loss.backward()
            optimizer.step()
            losses.append(await loss.get())
    assert asked[0] == ITERATIONS  # one round trip per iteration: loss.get()
    assert losses[-1] < losses[0]
    assert await ft.get_model(model) is model
    assert type(model.weight) is torch.nn.Parameter  # a local model again
    local = _local_training(lambda params: torch.optim.SGD(params, lr=0.1))
    assert_close(model.weight, local.weight)
    assert_close(model.bias, local.bias)
    assert model.weight.grad is not None  # gradients come back too, as in PySyft
    assert_close(model.weight.grad, local.weight.grad)
    del data, target, pred, loss


@pytest.mark.anyio
async def test_part2_loop_by_hand_with_no_grad_equals_local(ft_worker: ft.WorkerHandle) -> None:
    torch.manual_seed(1)
    weights, bias = torch.rand(2, 1, requires_grad=True), torch.rand(1, requires_grad=True)
    local_w, local_b = weights.detach().clone(), bias.detach().clone()
    w, b = ft.send(weights, ft_worker), ft.send(bias, ft_worker)
    data, target = ft.send(DATA, ft_worker), ft.send(TARGET, ft_worker)
    with round_trips(ft_worker) as asked:
        for _ in range(ITERATIONS):
            loss = ((data @ w + b - target) ** 2).sum()
            loss.backward()
            with torch.no_grad():  # reaches the worker with each operation it encloses
                w -= 0.1 * w.grad
                b -= 0.1 * b.grad
                w.grad.zero_()
                b.grad.zero_()
            await loss.get()
    assert asked[0] == ITERATIONS
    local_w.requires_grad_(True)
    local_b.requires_grad_(True)
    for _ in range(ITERATIONS):
        loss = ((DATA @ local_w + local_b - TARGET) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            local_w -= 0.1 * local_w.grad
            local_b -= 0.1 * local_b.grad
            local_w.grad.zero_()
            local_b.grad.zero_()
    assert_close(await w.get(), local_w)
    assert_close(await b.get(), local_b)
    del data, target


@pytest.mark.anyio
async def test_a_remote_models_parameters_by_hand_equal_local(ft_worker: ft.WorkerHandle) -> None:
    model = ft.send(_model(), ft_worker)
    data, target = ft.send(DATA, ft_worker), ft.send(TARGET, ft_worker)
    for _ in range(ITERATIONS):
        loss = ((model(data) - target) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            for parameter in model.parameters():
                assert isinstance(parameter.grad, RemoteGradient)
                parameter -= 0.1 * parameter.grad
                parameter.grad = None  # as zero_grad does: None until the next backward
        assert all(parameter.grad is None for parameter in model.parameters())
    await ft.get_model(model)
    local = _model()
    for _ in range(ITERATIONS):
        loss = ((local(DATA) - TARGET) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            for parameter in local.parameters():
                parameter -= 0.1 * parameter.grad  # type: ignore[operator]
                parameter.grad = None
    assert_close(model.weight, local.weight)
    assert_close(model.bias, local.bias)
    del data, target


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.05, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
async def test_torch_optimizers_on_a_remote_model_equal_local(
    ft_worker: ft.WorkerHandle, name: str
) -> None:
    make = OPTIMIZERS[name]
    model = ft.send(_mlp(), ft_worker)
    optimizer = make(model.parameters())
    data, target = ft.send(DATA, ft_worker), ft.send(TARGET, ft_worker)
    with round_trips(ft_worker) as asked:
        for _ in range(5):
            optimizer.zero_grad()
            F.mse_loss(model(data), target).backward()
            optimizer.step()
    assert asked[0] == 0  # every step pipelined
    await ft.get_model(model)
    local = _mlp()
    local_optimizer = make(local.parameters())
    for _ in range(5):
        local_optimizer.zero_grad()
        F.mse_loss(local(DATA), TARGET).backward()
        local_optimizer.step()
    for got, expected in zip(model.parameters(), local.parameters(), strict=True):
        assert_close(got, expected)
    del optimizer, data, target  # the optimizer's state points to the worker


@pytest.mark.anyio
async def test_a_copy_of_a_remote_model_is_a_model_of_its_own(ft_worker: ft.WorkerHandle) -> None:
    model = ft.send(_model(), ft_worker)
    twin = ft.copy_model(model)
    assert twin is not model
    assert isinstance(twin.weight, RemoteParameter)
    assert twin.weight.pointer.id_at_location != model.weight.pointer.id_at_location
    with torch.no_grad():
        twin.weight.add_(1.0)  # changes the copy only
    await ft.get_model(twin)
    await ft.get_model(model)
    assert_close(twin.weight, _model().weight + 1.0)
    assert_close(model.weight, _model().weight)
    assert twin.weight.requires_grad


@pytest.mark.anyio
async def test_a_remote_model_refuses_what_needs_its_values(ft_worker: ft.WorkerHandle) -> None:
    model = ft.send(_model(), ft_worker)
    with pytest.raises(TypeError, match="needs its value"):
        model.weight.tolist()
    with pytest.raises(ft.FedTensorError, match="already on a worker"):
        ft.send(model, ft_worker)
    assert "RemoteParameter ->" in repr(model.weight)
    await ft.get_model(model)


# -- no_grad and autograd.grad ----------------------------------------------------------------


@pytest.mark.anyio
async def test_no_grad_on_the_client_reaches_the_worker(ft_worker: ft.WorkerHandle) -> None:
    w = ft.send(torch.ones(3, requires_grad=True), ft_worker)
    with torch.no_grad():
        doubled = w * 2
        w.add_(1.0)  # an in-place change of a leaf that requires grad: only without grad
    assert not (await doubled).requires_grad
    assert (await (w * 2)).requires_grad
    with pytest.raises(ft.RemoteError, match="leaf Variable"):
        await w.add_(1.0)
    assert torch.equal(await w.get(), torch.full((3,), 2.0))
    del doubled


@pytest.mark.anyio
async def test_autograd_grad_on_pointers_equals_local(ft_worker: ft.WorkerHandle) -> None:
    torch.manual_seed(2)
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    remote_a, remote_b = ft.send(a, ft_worker), ft.send(b, ft_worker)
    remote = torch.autograd.grad((remote_b @ remote_a).pow(2).sum(), [remote_a, remote_b])
    local = torch.autograd.grad((b @ a).pow(2).sum(), [a, b])
    assert len(remote) == 2
    assert [pointer.shape for pointer in remote] == [a.shape, b.shape]
    for pointer, expected in zip(remote, local, strict=True):
        assert_close(await pointer.get(), expected)
    assert (await remote_a.get()).grad is None  # autograd.grad leaves .grad alone
    del remote_b


@pytest.mark.anyio
async def test_backward_of_a_non_scalar_result_still_raises_at_once(
    ft_worker: ft.WorkerHandle,
) -> None:
    x = ft.send(torch.ones(3, requires_grad=True), ft_worker)
    with pytest.raises(ft.RemoteError, match="only for scalar outputs"):
        (x * 2).backward()  # its shape is known locally now
    del x


# -- multi-output operations, len, iteration, shapes -----------------------------------------

X = torch.arange(24.0).reshape(4, 6) % 7

MULTI_OUTPUT: dict[str, Callable[[Any], Any]] = {
    "split": lambda t: torch.split(t, 3, dim=1),
    "split-sizes": lambda t: t.split([1, 3], dim=0),
    "chunk": lambda t: torch.chunk(t, 2),
    "max-dim": lambda t: t.max(dim=1),
    "min-dim": lambda t: torch.min(t, dim=0),
    "sort": lambda t: t.sort(dim=1, descending=True),
    "topk": lambda t: torch.topk(t, 2),
    "unbind": lambda t: t.unbind(1),
    "std_mean": lambda t: torch.std_mean(t, dim=0),
    "var_mean": lambda t: torch.var_mean(t, dim=1),
    "tensor_split": lambda t: torch.tensor_split(t, 3, dim=1),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(MULTI_OUTPUT))
async def test_multi_output_operations_give_one_pointer_per_output(
    ft_worker: ft.WorkerHandle, name: str
) -> None:
    operation = MULTI_OUTPUT[name]
    expected = operation(X)
    x = ft.send(X, ft_worker)
    with round_trips(ft_worker) as asked:
        outputs = operation(x)
        assert type(outputs) is type(expected)
        assert len(outputs) == len(expected)
        # Each output is usable at once: an operation on it, before any get().
        used = [output + 0 for output in outputs]
        assert [(o.shape, o.dtype) for o in used] == [(e.shape, e.dtype) for e in expected]
    assert asked[0] == 0
    for pointer, value in zip(used, expected, strict=True):
        assert torch.equal(await pointer.get(), value)
    if hasattr(expected, "indices"):  # torch.return_types keep their field names
        assert torch.equal(await outputs.indices.get(), expected.indices)
    del x, outputs


@pytest.mark.anyio
async def test_a_multi_output_operation_on_a_multi_pointer_gives_multi_pointers(
    ft_workers: Any,
) -> None:
    bob, alice = await ft_workers("bob"), await ft_workers("alice")
    both = ft.send(X, bob, alice)
    values, indices = both.max(dim=1)
    assert isinstance(indices, ft.MultiPointerTensor)
    assert [torch.equal(got, X.max(dim=1).indices) for got in await indices.get()] == [True] * 2
    del both, values


@pytest.mark.anyio
async def test_len_iteration_and_unpacking_over_the_first_dimension(
    ft_worker: ft.WorkerHandle,
) -> None:
    x = ft.send(X[:3], ft_worker)
    assert len(x) == 3
    first, second, third = x
    assert torch.equal(await second.get(), X[1])
    assert [tuple(row.shape) for row in x] == [(6,), (6,), (6,)]
    assert torch.equal(await torch.stack(list(x)).get(), X[:3])
    with pytest.raises(TypeError, match="0-d"):
        len(x.sum())
    unknown = x[x > 2]  # its shape depends on the values
    assert unknown.shape is None
    with pytest.raises(TypeError, match="round trip"):
        len(unknown)
    with pytest.raises(TypeError, match="not iterable"):
        iter(unknown)
    del first, third, unknown


@pytest.mark.anyio
async def test_shapes_and_dtypes_of_results_are_known_without_a_round_trip(
    ft_worker: ft.WorkerHandle,
) -> None:
    w = torch.randn(5, 6)
    cases: list[Callable[[Any, Any], Any]] = [
        lambda x, w: x * 2 + 1,
        lambda x, w: (x > 3).sum(dim=0),
        lambda x, w: x.long() + 1.5,
        lambda x, w: x.to(torch.float64).T,
        lambda x, w: x @ w.t(),
        lambda x, w: F.linear(x, w),
        lambda x, w: F.softmax(x, dim=1).view(-1)[2:9],
        lambda x, w: x[1:, None, ::2],
        lambda x, w: torch.cat([x, x]).mean(),
    ]
    x, remote_w = ft.send(X, ft_worker), ft.send(w, ft_worker)
    with round_trips(ft_worker) as asked:
        results = [case(x, remote_w) for case in cases]
        expected = [case(X, w) for case in cases]
        for result, value in zip(results, expected, strict=True):
            assert (result.shape, result.dtype) == (value.shape, value.dtype)
        # Cached by shapes and types: a float's value never sets a shape, but a scale
        # factor's does.
        image = ft.send(torch.ones(1, 1, 2, 2), ft_worker)
        assert [F.interpolate(image, scale_factor=f).shape[-1] for f in (2.0, 3.0)] == [4, 6]
        assert (x * 0.5).dtype == (x * 0.25).dtype == torch.float32
        # What torch's module code asks (`input.dim()`), answered here.
        assert (x.dim(), x.ndim, x.size(), x.size(-1), x.numel()) == (2, 2, X.size(), 6, 24)
        assert x.is_floating_point()
        assert not x.long().is_floating_point()
        y = ft.send(torch.ones(3), ft_worker)
        y.unsqueeze_(0)  # an in-place change of shape is followed
        assert y.shape == (1, 3)
        # Inferring the shape of a random operation draws nothing from the client's RNG.
        rng = torch.get_rng_state()
        noisy = [F.dropout(x, 0.5), x.bernoulli(0.5), x.clone().normal_()]
        assert torch.equal(rng, torch.get_rng_state())
        assert [tuple(pointer.shape) for pointer in noisy] == [(4, 6)] * 3
    assert asked[0] == 0
    for result, value in zip(results, expected, strict=True):
        assert_close(await result.get(), value)
    assert (await y.get()).shape == (1, 3)
    del x, remote_w, image, noisy


# -- the worker operations refuse what they do not serve ---------------------------------------


@pytest.mark.anyio
async def test_the_training_worker_operations_refuse_what_they_do_not_serve(
    ft_worker: ft.WorkerHandle,
) -> None:
    client = ft_worker.client
    x = ft.send(torch.ones(2), ft_worker)
    # no_grad runs allow-listed operations only, and not itself or other worker operations.
    for op in ("builtins.eval", "torch.load", "fedtensor.local_update", "fedtensor.no_grad"):
        refused = call_on(client, "fedtensor.no_grad", (op, x), {})
        with pytest.raises(ft.ForbiddenOperation, match="not allowed"):
            await refused
    with pytest.raises(ft.RemoteError, match="takes a tuple or list"):
        await call_on(client, "fedtensor.element", (x, 0), {})
    with pytest.raises(ft.RemoteError, match="sets data, grad, requires_grad"):
        await call_on(client, "fedtensor.set_attribute", (x, "__class__", None), {})
    # New data of another size would keep memory the budget charged to another object.
    big = ft.send(torch.ones(1000), ft_worker)
    with pytest.raises(ft.RemoteError, match="same shape and dtype"):
        await call_on(client, "fedtensor.set_attribute", (x, "data", big), {})
    same = ft.send(torch.full((2,), 3.0), ft_worker)
    await call_on(client, "fedtensor.set_attribute", (x, "data", same), {})
    assert torch.equal(await x.get(), torch.full((2,), 3.0))
    x = ft.send(torch.ones(2), ft_worker)
    with pytest.raises(ft.RemoteError, match="batched"):
        await call_on(client, "fedtensor.autograd_grad", (x.sum(), [x]), {"is_grads_batched": True})
    assert torch.equal(await x.get(), torch.ones(2))  # the worker kept serving


@pytest.mark.anyio
async def test_an_operation_under_no_grad_is_held_to_the_memory_quota(
    ft_worker_processes: Callable[..., WorkerProcess],
) -> None:
    process = ft_worker_processes("h7-quota", "--memory-quota", "256K")
    async with ft.connect(process.url, token=process.token) as bob:
        x = ft.send(torch.ones(10), bob)
        with torch.no_grad():
            big = x.repeat(100_000)  # 4 MB: checked as itself, not as fedtensor.no_grad
        with pytest.raises(ft.LimitExceeded, match=r"Tensor\.repeat would allocate") as refused:
            await big  # refused before it allocates, not once made
        assert "memory quota" in str(refused.value)
        assert torch.equal(await x.get(), torch.ones(10))


# -- the blocking API, PySyft's spelling -------------------------------------------------------


def test_blocking_part2_loop_with_torch_hook_equals_local() -> None:
    hook = sy.TorchHook(torch)
    try:
        bob = sy.VirtualWorker(hook, id="h7-training-bob")
        model = _model()
        optimizer = torch.optim.SGD(params=model.parameters(), lr=0.1)
        data, target = DATA.send(bob), TARGET.send(bob)  # type: ignore[attr-defined]
        model.send(bob)  # type: ignore[operator]
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            pred = model(data)
            loss = ((pred - target) ** 2).sum()
            loss.backward()
            optimizer.step()
            loss.get()
        copy = model.copy()  # type: ignore[operator]
        assert model.get() is model  # type: ignore[operator]
        local = _local_training(lambda params: torch.optim.SGD(params, lr=0.1))
        assert_close(model.weight, local.weight)
        assert_close(model.bias, local.bias)
        copy.get()
        assert_close(copy.weight, local.weight)
        values, indices = data.max(dim=1)
        assert torch.equal(indices.get(), DATA.max(dim=1).indices)
        del data, target, pred, loss, values
    finally:
        hook.unhook()
    assert not hasattr(torch.nn.Module, "send")


def test_blocking_model_moves_worker_to_worker() -> None:
    hook = sy.TorchHook(torch)
    try:
        bob = sy.VirtualWorker(hook, id="h7-move-bob")
        alice = sy.VirtualWorker(hook, id="h7-move-alice")
        model = _model()
        model.send(bob)  # type: ignore[operator]
        model.move(alice)  # type: ignore[operator]
        assert model.weight.location is alice
        data = DATA.send(alice)  # type: ignore[attr-defined]
        assert_close(model(data).get().detach(), _model()(DATA).detach())
        model.get()  # type: ignore[operator]
        assert_close(model.weight, _model().weight)
        del data
    finally:
        hook.unhook()


def test_pysyft_optims_keeps_one_optimizer_per_worker() -> None:
    from fedtensor.sync.federated.floptimizer import Optims

    def make(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    hook = sy.TorchHook(torch)
    try:
        bob = sy.VirtualWorker(hook, id="h7-optims-bob")
        alice = sy.VirtualWorker(hook, id="h7-optims-alice")
        model = _model()
        optims = Optims([bob.id, alice.id], optim=make(model.parameters()))
        assert optims.count() == 2
        assert optims.get_optim(bob) is optims.get_optim(bob.id)
        assert optims.get_optim(bob) is not optims.get_optim(alice)
        for _ in range(2):
            for worker in (bob, alice):  # Part 10's loop: the model visits each worker
                data, target = DATA.send(worker), TARGET.send(worker)  # type: ignore[attr-defined]
                model.send(data.location)  # type: ignore[operator]
                opt = optims.get_optim(data.location.id)
                opt.zero_grad()  # the gradient that came along with the model is cleared
                ((model(data) - target) ** 2).sum().backward()
                opt.step()
                model.get()  # type: ignore[operator]
                del data, target
        local = _model()
        local_optims = [make(local.parameters()) for _ in range(2)]
        for _ in range(2):
            for opt in local_optims:
                opt.zero_grad()
                ((local(DATA) - TARGET) ** 2).sum().backward()
                opt.step()
        assert_close(model.weight, local.weight)
        assert_close(model.bias, local.bias)
    finally:
        hook.unhook()


@pytest.mark.anyio
async def test_a_remote_models_buffers_train_as_local_ones(ft_worker: ft.WorkerHandle) -> None:
    def make() -> torch.nn.Sequential:
        torch.manual_seed(4)
        return torch.nn.Sequential(
            torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
        )

    model = ft.send(make(), ft_worker)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data, target = ft.send(DATA, ft_worker), ft.send(TARGET, ft_worker)
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(data), target).backward()
        optimizer.step()
    await ft.get_model(model)
    local = make()
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
    for _ in range(3):
        local_optimizer.zero_grad()
        F.mse_loss(local(DATA), TARGET).backward()
        local_optimizer.step()
    for (name, got), expected in zip(
        model.state_dict().items(), local.state_dict().values(), strict=True
    ):
        assert_close(got, expected, msg=name)
    assert int(model[1].num_batches_tracked) == 3
    del data, target
