"""PySyft's plans and data-set helpers in fedtensor.sync (issue 9): ``func2plan``,
``sy.Plan``, ``BaseDataset``/``federate``/``FederatedDataLoader``, ``VirtualWorker(data=)``,
``PrivateGridNetwork`` and ``sy.local_worker``.

The plan tests run over every transport (tests/conftest.py): the worker compiles and
checks a plan it is sent like any other (``fedtensor.run_plan``). The blocking tests
name their workers apart, since a blocking worker of the same id replaces the one before.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import fedtensor as ft
import fedtensor.sync as sy
from fedtensor.protocol.messages import Ref
from fedtensor.sync.plans import PointerPlan
from fedtensor.testing import WorkerFactory


@pytest.fixture
def hook() -> Iterator[sy.TorchHook]:
    hook = sy.TorchHook(torch)
    yield hook
    hook.unhook()


class TwoLayers(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(2, 3)
        self.fc2 = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=-1)


# -- plans ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_sent_plan_runs_on_the_worker_with_its_state(ft_worker: ft.WorkerHandle) -> None:
    torch.manual_seed(0)
    net = TwoLayers()
    net.build(torch.zeros(4, 2))
    assert net.is_built
    assert net.operations >= 4
    pointer_plan = net.send(ft_worker)
    x = torch.randn(5, 2)
    expected = net(x).detach()
    # The worker holds its own copy of the state: changing the local model later
    # changes nothing there.
    with torch.no_grad():
        net.fc1.weight.zero_()
    result = pointer_plan(ft.send(x, ft_worker))
    assert torch.allclose(await result.get(), expected)
    # A local tensor travels with the command.
    assert torch.allclose(await pointer_plan(x).get(), expected)
    del pointer_plan, result


@pytest.mark.anyio
async def test_function_plans_with_two_inputs_and_state(ft_worker: ft.WorkerHandle) -> None:
    @sy.func2plan(args_shape=[(1, 2), (-1, 2)])
    def sum_abs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.abs(x + y)

    @sy.func2plan(args_shape=[(1,)], state=(torch.tensor([10]),))
    def shifted(x: torch.Tensor, state: sy.plans.PlanState) -> torch.Tensor:
        (bias,) = state.read()
        return x.abs() + bias

    assert sum_abs.is_built
    assert shifted.is_built
    a, b = torch.tensor([[1.0, -5.0]]), torch.tensor([[-3.0, 1.0]])
    out = sum_abs.send(ft_worker)(ft.send(a, ft_worker), ft.send(b, ft_worker))
    assert torch.equal(await out.get(), torch.tensor([[2.0, 4.0]]))
    out = shifted.send(ft_worker)(ft.send(torch.tensor([-1, 2]), ft_worker))
    assert torch.equal(await out.get(), torch.tensor([11, 12]))
    # Built plans run locally too, as PySyft's did.
    assert torch.equal(shifted(torch.tensor([-3])), torch.tensor([13]))
    del out


def test_an_unbuilt_plan_is_refused_as_pysyft_refused_it() -> None:
    @sy.func2plan()
    def double(x: torch.Tensor) -> torch.Tensor:
        return x + x

    assert not double.is_built
    with pytest.raises(RuntimeError, match="not built") as refused:
        double.send(object())  # type: ignore[arg-type]
    assert isinstance(refused.value, ft.PlanError)


def test_a_plan_calling_what_a_worker_refuses_fails_while_building() -> None:
    @sy.func2plan()
    def leaks(x: torch.Tensor) -> torch.Tensor:
        return x + x.data_ptr()

    with pytest.raises(ft.ForbiddenOperation, match="data_ptr"):
        leaks.build(torch.zeros(2))
    assert not leaks.is_built

    @sy.func2plan()
    def branches(x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x

    with pytest.raises(ft.PlanError, match="branches"):
        branches.build(torch.zeros(2))


@pytest.mark.anyio
async def test_the_worker_checks_a_plan_it_is_sent(ft_worker: ft.WorkerHandle) -> None:
    # A client that skips build's checks and forges the wire values itself.
    forged = {
        "format": 1,
        "nodes": [
            ["input", 0, (), {}],
            ["call", "Tensor.data_ptr", (Ref(0),), {}],
            ["output", None, (Ref(1),), {}],
        ],
        "trainable": [],
    }
    plan = PointerPlan("forged", ft_worker, forged, {})
    with pytest.raises(ft.ForbiddenOperation, match="data_ptr"):
        await plan(ft.send(torch.zeros(2), ft_worker)).get()
    # Too many inputs for the plan: the worker's own error, and it keeps serving.
    double = sy.func2plan(args_shape=[(2,)])(lambda x: x + x)
    sent = double.send(ft_worker)
    with pytest.raises(ft.RemoteError, match="takes 1 input"):
        await sent(torch.ones(2), torch.ones(2)).get()
    assert torch.equal(await sent(torch.ones(2)).get(), torch.full((2,), 2.0))
    del plan, sent


@pytest.mark.anyio
async def test_a_plan_input_on_another_worker_is_a_location_error(
    ft_workers: WorkerFactory,
) -> None:
    bob, alice = await ft_workers("bob"), await ft_workers("alice")
    double = sy.func2plan(args_shape=[(2,)])(lambda x: x + x)
    on_bob = double.send(bob)
    elsewhere = ft.send(torch.ones(2), alice)
    with pytest.raises(ft.LocationError, match="alice"):
        on_bob(elsewhere)
    del on_bob, elsewhere


# -- data sets -----------------------------------------------------------------------------------


def test_federate_splits_in_order_and_the_loader_walks_worker_by_worker(
    hook: sy.TorchHook,
) -> None:
    bob = sy.VirtualWorker(hook, id="fl_bob")
    alice = sy.VirtualWorker(hook, id="fl_alice")
    data = torch.arange(20.0).reshape(10, 2)
    targets = torch.arange(10)
    federated = sy.BaseDataset(data, targets).federate((bob, alice))
    assert federated.workers == ["fl_bob", "fl_alice"]
    assert len(federated) == 10
    assert len(federated["fl_bob"]) == 5
    assert federated["fl_alice"].location is alice
    loader = sy.FederatedDataLoader(federated, batch_size=2)
    assert len(loader) == 5  # PySyft's count: ceil(10 / 2)
    batches = [(x.location.id, x.get(), y.get()) for x, y in loader]
    assert [where for where, _, _ in batches] == ["fl_bob"] * 3 + ["fl_alice"] * 3
    assert torch.equal(torch.cat([x for _, x, _ in batches]), data)  # bob has the first half
    assert torch.equal(torch.cat([y for _, _, y in batches]), targets)
    assert [len(y) for _, _, y in batches] == [2, 2, 1, 2, 2, 1]
    assert [len(y) for _, y in sy.FederatedDataLoader(federated, batch_size=2, drop_last=True)] == [
        2
    ] * 4
    torch.manual_seed(0)
    shuffled = [(x.get(), y.get()) for x, y in sy.FederatedDataLoader(federated, 3, shuffle=True)]
    seen = torch.cat([y for _, y in shuffled])
    assert sorted(seen.tolist()) == list(range(10))
    assert seen.tolist() != list(range(10))
    for x, y in shuffled:  # examples stay with their labels
        assert torch.equal(x[:, 0], 2.0 * y)
    # The same shards for fedtensor's own training, which sy.fit takes as they are.
    shards = federated.federated()
    assert shards.sizes() == {"fl_bob": 5, "fl_alice": 5}
    model = torch.nn.Linear(2, 10)
    history = sy.fit(model, federated, rounds=1, batch_size=5, progress=False)
    assert len(history) == 1
    assert sorted(history[0].completed) == ["fl_alice", "fl_bob"]


def test_a_federated_dataset_needs_data_on_workers() -> None:
    with pytest.raises(TypeError, match="on workers"):
        sy.FederatedDataset([sy.BaseDataset(torch.zeros(3, 2), torch.zeros(3))])
    with pytest.raises(ValueError, match="3 examples but 2 labels"):
        sy.BaseDataset(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(TypeError, match="FederatedDataset"):
        sy.FederatedDataLoader(sy.BaseDataset(torch.zeros(3, 2), torch.zeros(3)))  # type: ignore[arg-type]


def test_virtual_worker_data_grid_search_and_local_worker(hook: sy.TorchHook) -> None:
    first = torch.tensor([1.0, 2.0]).tag("#input", "#one")
    second = torch.tensor([3.0]).tag("#input").describe("the second")
    carol = sy.VirtualWorker(hook, id="grid_carol", data=(first, second))
    dave = sy.VirtualWorker(hook, id="grid_dave")
    gc.collect()  # the data stay: the worker holds their pointers
    assert len(carol._objects) == 2
    found = carol.search("#input")
    assert sorted(tuple(p.get().tolist()) for p in found) == [(1.0, 2.0), (3.0,)]
    grid = sy.PrivateGridNetwork(carol, dave)
    results = grid.search("#one")
    assert list(results) == ["grid_carol"]  # only workers where something was found
    assert torch.equal(results["grid_carol"][0].get(), first)
    assert grid.search("#nothing") == {}
    assert sy.local_worker is hook.local_worker is ft.local_worker()
    assert torch.tensor([1]).send(dave).owner is sy.local_worker


def test_the_contiguous_split_keeps_the_order() -> None:
    parts = ft.split_indices(torch.zeros(10), 3, split="contiguous")
    assert [part.tolist() for part in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
