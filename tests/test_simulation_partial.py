"""Partial sums of simulated clients: each executor answers a round with its clients'
weighted sum (``fedtensor.local_updates(..., partial_sum=True)``) when the strategy reads
only the weighted mean (``Strategy.partial_sums_ok``), and ``ft.fit`` ends where single
updates would have taken it (up to float64 reassociation)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import fedtensor as ft
import fedtensor.worker.actor
from fedtensor.federated.simulation import _from_columns
from fedtensor.federated.strategies import Update
from fedtensor.federated.trace import trace
from fedtensor.worker.local_update import local_update
from fedtensor.worker.local_update import memory_bytes as one_update_bytes
from fedtensor.worker.local_updates import local_updates, memory_bytes

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

FIT: dict[str, Any] = {"batch_size": 4, "lr": 0.1, "progress": False}


def _data(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


@contextlib.asynccontextmanager
async def _executors(count: int) -> Any:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(ft.VirtualWorker(f"ex{i}")) for i in range(count)]


@contextlib.contextmanager
def _commands() -> Iterator[list[dict[str, Any]]]:
    """The keywords of every ``fedtensor.local_updates`` the executors run."""
    original = fedtensor.worker.actor.local_updates
    seen: list[dict[str, Any]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(*args, **kwargs)

    fedtensor.worker.actor.local_updates = recording  # type: ignore[assignment]
    try:
        yield seen
    finally:
        fedtensor.worker.actor.local_updates = original


class SingleUpdates(ft.FedAvg):
    """FedAvg that asks for every update alone (what every run did before partial sums)."""

    partial_sums_ok = False


class Median(ft.FedAvg):
    """A robust strategy: the coordinate-wise median of the updates, which reads each one."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def aggregate(
        self, current: dict[str, torch.Tensor], updates: Sequence[Update], parameters: set[str]
    ) -> dict[str, torch.Tensor]:
        self.seen.append([update.worker for update in updates])
        return {
            key: torch.stack([update.state[key] for update in updates]).median(0).values
            for key in current
        }


def test_which_strategies_take_partial_sums() -> None:
    assert ft.FedAvg().partial_sums_ok
    assert ft.FedProx(mu=0.1).partial_sums_ok
    assert ft.FedAvgM().partial_sums_ok
    assert ft.FedAdam().partial_sums_ok
    assert not ft.FedBuff().partial_sums_ok
    # A strategy of one's own that reads the updates: single updates unless it says so.
    assert not Median().partial_sums_ok
    assert not SingleUpdates().partial_sums_ok

    class Declared(Median):
        partial_sums_ok = True

    assert Declared().partial_sums_ok


@pytest.mark.parametrize(
    "make",
    [ft.FedAvg, lambda: ft.FedProx(mu=0.1), ft.FedAvgM, lambda: ft.FedAdam(server_lr=0.05)],
    ids=["FedAvg", "FedProx", "FedAvgM", "FedAdam"],
)
async def test_partial_sums_end_where_single_updates_do(make: Any) -> None:
    x, y = _data(2_000)
    single_strategy = make()
    single_strategy.partial_sums_ok = False  # this instance: one update a client, as before
    fit = {"rounds": 3, "fraction": 0.2, "seed": 3, **FIT}
    async with _executors(2) as pool:
        clients = ft.simulate_clients((x, y), clients=100, executors=pool, seed=1)
        single, summed = _model(), _model()
        with _commands() as alone:
            expected = await ft.fit(single, clients, strategy=single_strategy, **fit)
        with _commands() as partial:
            history = await ft.fit(summed, clients, strategy=make(), **fit)
        clients.close()
    assert [kwargs.get("partial_sum", False) for kwargs in alone] == [False] * 6
    assert [kwargs.get("partial_sum", False) for kwargs in partial] == [True] * 6
    for key, value in single.state_dict().items():
        # The same updates, summed in another order (float64) before the mean.
        torch.testing.assert_close(summed.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    for got, want in zip(history, expected, strict=True):
        assert got.sampled == want.sampled
        assert got.completed == want.completed
        assert got.train_loss == want.train_loss
        assert got.train_accuracy == want.train_accuracy
        # One float64 sum per executor came back, not 20 float32 states.
        assert got.bytes_received == 2 * 2 * (4 * 3 + 3) * 4
        assert want.bytes_received == 20 * (4 * 3 + 3) * 4


async def test_a_robust_strategy_still_gets_single_updates() -> None:
    x, y = _data(1_000)
    strategy = Median()
    async with _executors(2) as pool:
        clients = ft.simulate_clients((x, y), clients=100, executors=pool, seed=1)
        with _commands() as commands:
            history = await ft.fit(
                _model(), clients, rounds=2, fraction=0.1, strategy=strategy, **FIT
            )
        clients.close()
    assert all("partial_sum" not in kwargs for kwargs in commands)
    # The median saw every client's own update, by the client's name.
    assert strategy.seen == [list(metrics.completed) for metrics in history]
    assert all(len(names) == 10 for names in strategy.seen)


async def test_central_dp_gets_single_updates() -> None:
    x, y = _data(1_000)
    async with _executors(1) as pool:
        clients = ft.simulate_clients((x, y), clients=50, executors=pool, seed=1)
        with _commands() as commands:
            await ft.fit(
                _model(), clients, rounds=1, fraction=0.2,
                dp=ft.CentralDP(noise_multiplier=0.5, clip_norm=1.0), **FIT,
            )  # fmt: skip
        clients.close()
    assert commands
    assert all("partial_sum" not in kwargs for kwargs in commands)  # it clips each update


async def test_a_client_that_fails_is_left_out_of_the_sum() -> None:
    x, y = _data(200)
    ids = torch.arange(200) % 10
    y = y.clone()
    y[ids == 3] = 99  # client-3's labels are out of range: its training raises
    async with _executors(1) as pool:
        clients = ft.simulate_clients((x, y), client_ids=ids, executors=pool)
        single, summed = _model(), _model()
        fit = {"rounds": 1, "fraction": 1.0, **FIT}
        expected = await ft.fit(single, clients, strategy=SingleUpdates(), **fit)
        history = await ft.fit(summed, clients, **fit)
        clients.close()
    assert set(history[0].failed) == set(expected[0].failed) == {"client-3"}
    assert history[0].completed == expected[0].completed
    for key, value in single.state_dict().items():
        torch.testing.assert_close(summed.state_dict()[key], value, rtol=1e-6, atol=1e-7)


async def test_a_sum_unlike_the_model_is_refused() -> None:
    x, y = _data(400)
    original = fedtensor.worker.actor.local_updates

    def wrong_shape(*args: Any, **kwargs: Any) -> Any:
        reply = original(*args, **kwargs)
        reply["sum"]["weight"] = torch.zeros(2, dtype=torch.float64)
        return reply

    def wrong_examples(*args: Any, **kwargs: Any) -> Any:
        reply = original(*args, **kwargs)
        reply["examples"] += 1
        return reply

    async with _executors(1) as pool:
        clients = ft.simulate_clients((x, y), clients=20, executors=pool)
        for forged, message in ((wrong_shape, "unlike the model's"), (wrong_examples, "report")):
            fedtensor.worker.actor.local_updates = forged  # type: ignore[assignment]
            try:
                with pytest.raises(ft.ProtocolError, match=message):
                    await ft.fit(_model(), clients, rounds=1, fraction=0.5, **FIT)
            finally:
                fedtensor.worker.actor.local_updates = original
        clients.close()


async def test_a_stopped_executor_times_out_with_all_its_clients() -> None:
    x, y = _data(400)
    async with ft.local_workers(2, threads=1) as processes:
        clients = ft.simulate_clients((x, y), clients=40, executors=list(processes))
        model = _model()
        await ft.fit(model, clients, rounds=1, fraction=0.5, **FIT)  # both answer
        os.kill(processes.pids[1], signal.SIGSTOP)  # alive, but answers nothing
        try:
            with anyio.fail_after(60):
                history = await ft.fit(
                    model, clients, rounds=1, fraction=0.5, round_timeout=2.0, **FIT
                )
        finally:
            os.kill(processes.pids[1], signal.SIGCONT)
        clients.close()
    stopped = {f"client-{i}" for i in range(20, 40)}
    sampled = set(history[0].sampled)
    # Every sampled client of the stopped executor, not only the one its wait was on.
    assert set(history[0].failed) == sampled & stopped
    assert sampled & stopped
    assert all("no update within 2.0 s" in why for why in history[0].failed.values())
    assert set(history[0].completed) == sampled - stopped


async def test_a_round_sends_each_worker_one_frame_its_commands_and_their_fetch(
    frames_sent: Callable[..., dict[str, list[list[str]]]],
) -> None:
    """The reply's fetch goes with the commands (``fetch_soon``): sent after them, in a
    frame of its own, it cost a send, a wake-up and a decoding more per worker and round."""
    x, y = _data(400)
    async with ft.local_workers(2, threads=1) as processes:
        frames = frames_sent(processes)
        simulated = ft.simulate_clients((x, y), clients=40, executors=list(processes))
        federated = ft.federate((x, y), list(processes), seed=0)
        for data in (simulated, federated):
            for seen in frames.values():
                seen.clear()
            with anyio.fail_after(60):
                history = await ft.fit(_model(), data, rounds=1, fraction=1.0, **FIT)
            assert len(history[0].completed) == len(data.shards)
            for seen in frames.values():
                asked = [kinds for kinds in seen if "Call" in kinds or "Fetch" in kinds]
                assert len(asked) == 1, seen
                (kinds,) = asked
                assert kinds.index("Call") < kinds.index("Fetch")
        simulated.close()
        del federated


def _plan_and_state(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
    plan = trace(model, torch.nn.functional.cross_entropy, (x[:4], y[:4])).wire
    return plan, {key: value.detach() for key, value in model.state_dict().items()}


def test_partial_sum_is_the_weighted_sum_of_the_updates() -> None:
    x, y = _data(60)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    plan, state = _plan_and_state(model, x, y)
    options = {"batch_size": 4, "lr": 0.1, "epochs": 2, "momentum": 0.5}
    rows = [[0, 8, 11], [8, 12, 12], [12, 60, 13]]  # whole batches: batch norm needs 2 rows
    y_bad = y.clone()
    y_bad[8:12] = 7  # the second client fails
    for labels, trained in ((y, rows), (y_bad, [rows[0], rows[2]])):
        reply = local_updates(plan, state, x, labels, rows, partial_sum=True, **options)
        assert isinstance(reply, dict)
        alone = [
            local_update(plan, state, x[a:b], labels[a:b], seed=seed, **options)
            for a, b, seed in trained
        ]
        assert reply["examples"] == sum(update["examples"] for update in alone)
        for key, value in state.items():
            summed = reply["sum"][key]
            if value.is_floating_point():
                expected = sum(
                    update["state"][key].double() * update["examples"] for update in alone
                )
                assert summed.dtype == torch.float64
                torch.testing.assert_close(summed, expected, rtol=1e-12, atol=1e-12)
            else:  # the batch norm's counter: the largest, as FedAvg takes
                assert torch.equal(summed, max(update["state"][key] for update in alone))
        assert set(reply["clients"]) == {"columns", "failed"}  # a tensor per figure
        clients = _from_columns(reply["clients"], 3, "w")
        assert len(clients) == 3
        assert all("state" not in client for client in clients)
        if labels is y_bad:
            assert clients[1]["failed"][1] == "IndexError"
        for client, update in zip([c for c in clients if "failed" not in c], alone, strict=True):
            assert client == {key: item for key, item in update.items() if key != "state"} | {
                "seconds": client["seconds"]
            }
    with pytest.raises(ft.PlanError, match="partial_sum"):
        local_updates(plan, state, x, y, rows, partial_sum=1)


def test_clients_as_a_tensor_train_as_the_list_does() -> None:
    x, y = _data(40)
    plan, state = _plan_and_state(_model(), x, y)
    rows = [[0, 9, 11], [9, 10, 12], [10, 40, 13]]
    as_list = local_updates(plan, state, x, y, rows, batch_size=4)
    as_tensor = local_updates(plan, state, x, y, torch.tensor(rows), batch_size=4)
    assert isinstance(as_list, list)
    assert isinstance(as_tensor, list)
    for one, other in zip(as_list, as_tensor, strict=True):
        assert one["loss"] == other["loss"]
        for key, value in one["state"].items():
            assert torch.equal(other["state"][key], value)
    for bad, message in (
        (torch.tensor(rows, dtype=torch.int32), "int64"),
        (torch.tensor(rows)[:, :2], "shape"),
        (torch.zeros(0, 3, dtype=torch.int64), "at least one"),
        (torch.tensor([[0, 9, 1], [9, 41, 2]]), "client 1: rows 9:41"),
        (torch.tensor([[0, 9, 1], [5, 5, 2]]), "client 1: rows 5:5"),
        (torch.tensor([[-1, 9, 1]]), "client 0: rows -1:9"),
    ):
        with pytest.raises(ft.PlanError, match=message):
            local_updates(plan, state, x, y, bad, batch_size=4)
        assert memory_bytes(plan, state, x, y, bad, limit=1 << 30, batch_size=4) == 0


def test_the_memory_check_counts_one_sum_not_every_update() -> None:
    x, y = _data(100)
    plan, state = _plan_and_state(nn.Linear(4, 3), x, y)
    rows = torch.tensor([[i * 10, i * 10 + 10, i] for i in range(10)])
    alone = one_update_bytes(plan, state, x[:10], y[:10], limit=1 << 30, batch_size=4)
    state_bytes = sum(value.nbytes for value in state.values())
    single = memory_bytes(plan, state, x, y, rows, limit=1 << 30, batch_size=4)
    summed = memory_bytes(plan, state, x, y, rows, limit=1 << 30, batch_size=4, partial_sum=True)
    assert single == alone + 9 * state_bytes
    assert summed == alone + 2 * state_bytes  # one float64 sum of the float32 entries
    # 10,000 clients: their updates alone would pass a quota that one sum fits in.
    many = torch.tensor([[0, 100, i] for i in range(10_000)])
    with pytest.raises(MemoryError, match="10000 clients' updates"):
        memory_bytes(plan, state, x, y, many, limit=1 << 18, batch_size=4)
    fits = memory_bytes(plan, state, x, y, many, limit=1 << 18, batch_size=4, partial_sum=True)
    assert (
        fits == one_update_bytes(plan, state, x, y, limit=1 << 30, batch_size=4) + 2 * state_bytes
    )


def test_a_forbidden_client_is_left_out_of_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtensor.worker.local_updates as module

    x, y = _data(40)
    plan, state = _plan_and_state(_model(), x, y)
    rows = [[0, 10, 1], [10, 20, 2], [20, 40, 3]]
    alone = module.local_update

    def forbidding(*args: Any, seed: int, **kwargs: Any) -> Any:
        if seed == 2:
            raise ft.ForbiddenOperation("ForbiddenOperation", "not for this one", "(plan)")
        return alone(*args, seed=seed, **kwargs)

    monkeypatch.setattr(module, "local_update", forbidding)
    reply = local_updates(plan, state, x, y, rows, partial_sum=True, batch_size=4)
    assert isinstance(reply, dict)
    assert _from_columns(reply["clients"], 3, "w")[1] == {
        "failed": ["forbidden", "ForbiddenOperation", "not for this one"]
    }
    assert reply["examples"] == 30
    expected = sum(
        alone(plan, state, x[a:b], y[a:b], seed=seed, batch_size=4)["state"]["weight"].double()
        * (b - a)
        for a, b, seed in (rows[0], rows[2])
    )
    torch.testing.assert_close(reply["sum"]["weight"], expected, rtol=1e-12, atol=1e-12)


def test_the_clients_figures_come_back_as_one_tensor_each() -> None:
    # A list of a dict per client cost the worker's budget and codec four items a
    # client after its last client trained; the figures are now one buffer each.
    x, y = _data(40)
    plan, state = _plan_and_state(_model(), x, y)
    rows = [[0, 10, 1], [10, 20, 2], [20, 40, 3]]
    y_bad = y.clone()
    y_bad[10:20] = 7  # the second client fails
    reply = local_updates(plan, state, x, y_bad, rows, partial_sum=True, batch_size=4)
    assert isinstance(reply, dict)
    columns = reply["clients"]["columns"]
    assert {name: column.dtype for name, column in columns.items()} == {
        "examples": torch.int64,
        "loss": torch.float64,
        "correct": torch.int64,
        "seconds": torch.float64,
    }
    assert columns["examples"].tolist() == [10, 0, 20]  # a failed client's row is 0
    [failed] = reply["clients"]["failed"]
    assert failed[:3] == [1, "remote", "IndexError"]
    clients = _from_columns(reply["clients"], 3, "w")
    assert clients[1] == {"failed": failed[1:]}
    for client, (a, b, seed) in zip((clients[0], clients[2]), (rows[0], rows[2]), strict=True):
        alone = local_update(plan, state, x[a:b], y_bad[a:b], seed=seed, batch_size=4)
        assert client == {key: item for key, item in alone.items() if key != "state"} | {
            "seconds": client["seconds"]
        }
        assert type(client["examples"]) is int
        assert type(client["loss"]) is float


def test_figures_of_another_kind_keep_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtensor.worker.local_updates as module

    x, y = _data(20)
    plan, state = _plan_and_state(_model(), x, y)
    alone = module.local_update

    def unusual(*args: Any, seed: int, **kwargs: Any) -> Any:
        reply = alone(*args, seed=seed, **kwargs)
        return reply | {"note": None} if seed == 2 else reply

    monkeypatch.setattr(module, "local_update", unusual)
    reply = local_updates(plan, state, x, y, [[0, 10, 1], [10, 20, 2]], partial_sum=True)
    assert isinstance(reply, dict)
    assert isinstance(reply["clients"], list)  # the clients disagree: the list as before
    assert reply["clients"][1]["note"] is None


def test_malformed_figures_are_refused() -> None:
    good = {"columns": {"examples": torch.tensor([3, 4])}, "failed": []}
    assert _from_columns(good, 2, "w") == [{"examples": 3}, {"examples": 4}]
    for bad, message in (
        ({"columns": {"examples": torch.tensor([3])}, "failed": []}, "not of 2 clients"),
        ({"columns": {"examples": torch.tensor([3, 4], dtype=torch.int32)}, "failed": []}, "2"),
        ({"columns": {"examples": [3, 4]}, "failed": []}, "not of 2 clients"),
        ({"columns": {}, "failed": [[0, "remote", "E", "m"]]}, "no figures"),
        (good | {"failed": [[2, "remote", "E", "m"]]}, "malformed failure"),
        (good | {"failed": [[0, "remote", "E", "m"], [0, "remote", "E", "m"]]}, "malformed"),
        (good | {"failed": [[0, "remote"]]}, "malformed failure"),
        (good | {"extra": 1}, "malformed"),
        ({"columns": []}, "malformed"),
    ):
        with pytest.raises(ft.ProtocolError, match=message):
            _from_columns(bad, 2, "w")
