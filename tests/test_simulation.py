"""Simulated clients (``ft.simulate_clients``): many clients as row ranges on a few executors,
trained by ``ft.fit`` exactly as the same shards on as many virtual workers would be."""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import fedtensor as ft
import fedtensor.worker.actor
import fedtensor.worker.local_updates
from fedtensor.federated.simulation import ClientShard

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

FIT: dict[str, Any] = {"batch_size": 4, "lr": 0.1, "progress": False}


def _data(count: int, features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, features, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


@contextlib.asynccontextmanager
async def _executors(count: int, prefix: str = "executor") -> AsyncIterator[list[ft.VirtualWorker]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(ft.VirtualWorker(f"{prefix}{i}")) for i in range(count)
        ]


@contextlib.contextmanager
def _counted_updates() -> Iterator[list[int]]:
    """Counts the local updates the executors run (one entry per update: its examples),
    alone (``fedtensor.local_update``) or a round's clients in one command
    (``fedtensor.local_updates``)."""
    original = fedtensor.worker.actor.local_update
    calls: list[int] = []

    def counting(plan: Any, state: Any, data: Any, targets: Any, **kwargs: Any) -> Any:
        calls.append(len(data))
        return original(plan, state, data, targets, **kwargs)

    fedtensor.worker.actor.local_update = counting  # type: ignore[assignment]
    fedtensor.worker.local_updates.local_update = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        fedtensor.worker.actor.local_update = original
        fedtensor.worker.local_updates.local_update = original


async def test_a_thousand_clients_train_as_a_thousand_virtual_workers_do() -> None:
    x, y = _data(3_000)
    fit = {"rounds": 3, "fraction": 0.01, "seed": 5, **FIT}
    async with _executors(1_000, "w") as workers:
        federated = ft.federate((x, y), workers, split="iid", seed=3)
        reference = _model()
        expected = await ft.fit(reference, federated, **fit)
        del federated
    for executors in (1, 2):
        async with _executors(executors) as pool:
            clients = ft.simulate_clients((x, y), clients=1_000, executors=pool, seed=3)
            model = _model()
            history = await ft.fit(model, clients, **fit)
            clients.close()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
        # The same clients were sampled, each named by its position in the data set.
        for got, want in zip(history, expected, strict=True):
            assert [int(name.split("-")[1]) for name in got.sampled] == [
                int(name[1:]) for name in want.sampled
            ]
            assert len(got.completed) == 10
            assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)


async def test_clients_on_worker_processes_train_as_on_a_virtual_worker() -> None:
    x, y = _data(1_000)
    fit = {"rounds": 2, "fraction": 0.1, "seed": 2, **FIT}
    async with _executors(1) as pool:
        clients = ft.simulate_clients((x, y), clients=100, executors=pool)
        reference = _model()
        expected = await ft.fit(reference, clients, **fit)
    async with ft.local_workers(2, threads=1) as processes:
        clients = ft.simulate_clients((x, y), clients=100, executors=list(processes))
        assert {shard.worker.id for shard in clients.shards[:50]} == {processes[0].id}
        model = _model()
        history = await ft.fit(model, clients, **fit)
        clients.close()
    assert [r.completed for r in history] == [r.completed for r in expected]
    for key, value in reference.state_dict().items():
        # Bit for bit: the same operations on one thread, in a process or in this one.
        assert torch.equal(model.state_dict()[key], value), key


async def test_sampling_is_reproducible_and_follows_the_seed() -> None:
    x, y = _data(2_000)
    async with _executors(2) as pool:
        clients = ft.simulate_clients((x, y), clients=500, executors=pool)
        runs = [
            [
                r.sampled
                for r in await ft.fit(_model(), clients, rounds=2, fraction=0.02, seed=s, **FIT)
            ]
            for s in (1, 1, 2)
        ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert all(len(sampled) == 10 and len(set(sampled)) == 10 for sampled in runs[0])
    assert runs[0][0] != runs[0][1]  # each round samples afresh


async def test_natural_partition_by_client_id() -> None:
    x, y = _data(300)
    ids = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(1)) * 3 + 7
    async with _executors(2) as pool:
        clients = ft.simulate_clients((x, y), client_ids=ids, executors=pool)
        present = sorted(set(ids.tolist()))
        assert [shard.name for shard in clients.shards] == [f"client-{i}" for i in present]
        assert clients.sizes() == {f"client-{i}": int((ids == i).sum()) for i in present}
        assert {shard.worker.id for shard in clients.shards} == {"executor0", "executor1"}
        for shard, client in zip(clients.shards, present, strict=True):
            # Each client's examples, in data set order, and nobody else's.
            torch.testing.assert_close(await shard.data.fetch(timeout=10), x[ids == client])
            torch.testing.assert_close(await shard.targets.fetch(timeout=10), y[ids == client])
        history = await ft.fit(_model(), clients, rounds=1, fraction=0.25, **FIT)
        assert set(history[0].completed) <= set(clients.sizes())
        with pytest.raises(ValueError, match="client_ids name"):
            ft.simulate_clients((x, y), clients=3, client_ids=ids, executors=pool)
        with pytest.raises(ValueError, match="300 examples but 299"):
            ft.simulate_clients((x, y), client_ids=ids[1:], executors=pool)
        with pytest.raises(TypeError, match="integers"):
            ft.simulate_clients((x, y), client_ids=ids.float(), executors=pool)


async def test_splits_and_bad_arguments() -> None:
    x, y = _data(600)
    async with _executors(3) as pool:
        for split in ("iid", "dirichlet", "shards"):
            clients = ft.simulate_clients(
                (x, y), clients=20, executors=pool, split=split, alpha=5.0, seed=2
            )
            parts = ft.split_indices(y, 20, split=split, alpha=5.0, seed=2)
            assert [shard.size for shard in clients.shards] == [len(part) for part in parts]
            # Pinned in contiguous runs of near-equal count.
            pinned = [shard.worker.id for shard in clients.shards]
            assert pinned == ["executor0"] * 7 + ["executor1"] * 7 + ["executor2"] * 6
            last = clients.shards[-1]
            torch.testing.assert_close(await last.data.fetch(timeout=10), x[parts[-1]])
        with pytest.raises(ValueError, match="unknown split"):
            ft.simulate_clients((x, y), clients=5, executors=pool, split="bogus")
        with pytest.raises(ValueError, match="at least one executor"):
            ft.simulate_clients((x, y), clients=5, executors=[])
        with pytest.raises(ValueError, match="number of clients"):
            ft.simulate_clients((x, y), executors=pool)
        # More executors than clients: the extra ones get nothing.
        two = ft.simulate_clients((x, y), clients=2, executors=pool)
        assert [shard.worker.id for shard in two.shards] == ["executor0", "executor1"]
        assert len(two.executors) == 2


async def test_a_round_costs_the_clients_sampled_not_the_clients_that_exist() -> None:
    x, y = _data(20_000)
    objects_during: list[int] = []
    updates_per_round = {}
    for count in (1_000, 10_000):
        async with _executors(1) as (executor,):
            clients = ft.simulate_clients((x, y), clients=count, executors=[executor])
            # The data went once, as one block: nothing stored per client.
            assert len(executor.objects) == 2
            with _counted_updates() as calls:
                await ft.fit(
                    _model(), clients, rounds=2, fraction=20 / count, seed=1, **FIT,
                    on_round=lambda _: objects_during.append(len(executor.objects)),
                )  # fmt: skip
            updates_per_round[count] = len(calls)
            # The block and one plan for all clients; the round's views are gone.
            assert objects_during[-1] == 3
            assert len(executor.objects) == 2  # fit let its plan go
            clients.close()
            del clients
            gc.collect()
            assert len(executor.objects) == 0  # closing frees the blocks
    assert updates_per_round == {1_000: 40, 10_000: 40}


async def test_clients_cost_a_few_small_objects_each() -> None:
    x, y = _data(20_000)
    async with _executors(2) as pool:
        gc.collect()
        before = len(gc.get_objects())
        clients = ft.simulate_clients((x, y), clients=10_000, executors=pool)
        gc.collect()
        per_client = (len(gc.get_objects()) - before) / 10_000
        assert per_client <= 2.5  # a ClientShard and its attribute dict
        assert all(isinstance(shard, ClientShard) for shard in clients.shards)
        assert len(clients) == 20_000
        clients.close()
        assert clients.shards == ()
        assert clients.executors == []


MEMORY_SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, json, resource, sys
    import torch
    import fedtensor as ft

    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    async def main(clients):
        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(100_000, 64, generator=generator)
        y = torch.randint(0, 10, (100_000,), generator=generator)
        async with ft.VirtualWorker("executor") as executor:
            gc.collect()
            start = rss()
            data = ft.simulate_clients((x, y), clients=clients, executors=[executor])
            model = torch.nn.Sequential(
                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
            )
            await ft.fit(model, data, rounds=1, fraction=100 / clients, progress=False)
            gc.collect()
            grown = rss() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"grown": grown, "peak": peak}))

    asyncio.run(main(int(sys.argv[1])))
    """
)


def _memory(*clients: int) -> list[dict[str, int]]:
    """Each count's figures, measured in processes of their own (run side by side)."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", MEMORY_SCRIPT, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for count in clients
    ]
    figures = []
    try:
        for run in runs:
            out, err = run.communicate(timeout=50)
            assert run.returncode == 0, err
            figures.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for run in runs:
            run.kill()  # a no-op for those that finished
            run.wait(timeout=10)
    return figures


def test_ten_thousand_clients_fit_in_memory() -> None:
    """100,000 digit-shaped examples over 10,000 clients: under 1 GB, and 10,000 clients cost
    about what 1,000 do beyond the executor's one copy of the data (25.6 MB)."""
    many, few = _memory(10_000, 1_000)
    assert many["peak"] < 1 << 30
    assert many["grown"] - few["grown"] < 16 << 20


# -- one command per executor and round (fedtensor.local_updates) -----------------------------


@contextlib.contextmanager
def _counted_commands() -> Iterator[list[tuple[str, int]]]:
    """The training commands executors run: ``(operation, clients it trains)`` each."""
    single, batched = fedtensor.worker.actor.local_update, fedtensor.worker.actor.local_updates
    commands: list[tuple[str, int]] = []

    def one(*args: Any, **kwargs: Any) -> Any:
        commands.append(("fedtensor.local_update", 1))
        return single(*args, **kwargs)

    def many(*args: Any, **kwargs: Any) -> Any:
        commands.append(("fedtensor.local_updates", len(args[4])))
        return batched(*args, **kwargs)

    fedtensor.worker.actor.local_update = one  # type: ignore[assignment]
    fedtensor.worker.actor.local_updates = many  # type: ignore[assignment]
    try:
        yield commands
    finally:
        fedtensor.worker.actor.local_update = single
        fedtensor.worker.actor.local_updates = batched


async def test_a_round_sends_each_executor_one_command_for_all_its_clients() -> None:
    x, y = _data(2_000)
    async with _executors(2) as pool:
        clients = ft.simulate_clients((x, y), clients=200, executors=pool, seed=1)
        with _counted_commands() as commands:
            history = await ft.fit(_model(), clients, rounds=3, fraction=0.2, seed=4, **FIT)
        clients.close()
    assert [len(r.completed) for r in history] == [40, 40, 40]
    # Per round, one command per executor (both hold sampled clients), none per client.
    assert len(commands) == 6
    assert {op for op, _ in commands} == {"fedtensor.local_updates"}
    assert sum(count for _, count in commands) == 120


async def test_local_updates_is_one_local_update_per_client() -> None:
    from fedtensor.federated.trace import trace
    from fedtensor.worker.local_update import local_update
    from fedtensor.worker.local_updates import local_updates

    x, y = _data(40)
    model = _model()
    plan = trace(model, torch.nn.functional.cross_entropy, (x[:4], y[:4])).wire
    state = {key: value.detach() for key, value in model.state_dict().items()}
    options = {"batch_size": 4, "lr": 0.1, "epochs": 2, "momentum": 0.5}
    rows = [[0, 9, 11], [9, 10, 12], [10, 40, 13]]
    replies = local_updates(plan, state, x, y, rows, **options)
    assert len(replies) == 3
    for (start, stop, seed), reply in zip(rows, replies, strict=True):
        alone = local_update(plan, state, x[start:stop], y[start:stop], seed=seed, **options)
        assert reply["examples"] == stop - start == alone["examples"]
        assert reply["loss"] == alone["loss"]
        assert reply["correct"] == alone["correct"]
        for key, value in alone["state"].items():
            assert torch.equal(reply["state"][key], value)
    # Malformed clients are refused as a whole, and the seed is each client's.
    for bad in ([], [[0, 41, 1]], [[3, 3, 1]], [[0, 1]], [[0.0, 1, 1]], "0:1"):
        with pytest.raises(ft.PlanError):
            local_updates(plan, state, x, y, bad, **options)
    with pytest.raises(TypeError, match="seed"):
        local_updates(plan, state, x, y, rows, seed=1)


async def test_a_client_that_fails_fails_alone_and_the_others_train() -> None:
    x, y = _data(200)
    ids = torch.arange(200) % 10
    y = y.clone()
    y[ids == 3] = 99  # client-3's labels are out of range: its training raises
    async with _executors(1) as pool:
        clients = ft.simulate_clients((x, y), client_ids=ids, executors=pool)
        history = await ft.fit(_model(), clients, rounds=1, fraction=1.0, **FIT)
        clients.close()
    assert set(history[0].failed) == {"client-3"}
    assert "IndexError" in history[0].failed["client-3"]
    assert len(history[0].completed) == 9


async def test_a_worker_refuses_local_updates_past_the_memory_quota() -> None:
    from fedtensor.federated.trace import trace
    from fedtensor.worker.budget import Ledger, check_worker_operation
    from fedtensor.worker.local_update import memory_bytes as one_update
    from fedtensor.worker.local_updates import memory_bytes

    x, y = _data(100)
    model = nn.Linear(4, 3)
    plan = trace(model, torch.nn.functional.cross_entropy, (x[:4], y[:4])).wire
    state = {key: value.detach() for key, value in model.state_dict().items()}
    rows = [[i * 10, i * 10 + 10, i] for i in range(10)]
    alone = one_update(plan, state, x[:10], y[:10], limit=1 << 30, batch_size=4)
    state_bytes = sum(value.nbytes for value in state.values())
    # The largest client's training and the other nine updates the reply holds.
    size = memory_bytes(plan, state, x, y, rows, limit=1 << 30, batch_size=4)
    assert size == alone + 9 * state_bytes
    args, options = (plan, state, x, y, rows), {"batch_size": 4}
    op = "fedtensor.local_updates"
    assert check_worker_operation(op, args, options, Ledger(size), {}) is None
    refused = check_worker_operation(op, args, options, Ledger(size - 1), {})
    assert refused is not None
    assert refused.kind == "limit"
    many = [[0, 100, i] for i in range(10_000)]  # the updates alone pass the quota
    refused = check_worker_operation(op, (plan, state, x, y, many), options, Ledger(1 << 16), {})
    assert refused is not None
    assert "10000 clients' updates" in refused.message


async def test_held_out_rows_follow_each_clients_training_rows() -> None:
    from fedtensor.federated.datasets import holdout_split

    x, y = torch.arange(60.0).reshape(60, 1), torch.arange(60) % 3
    async with _executors(2) as executors:
        clients = ft.simulate_clients((x, y), clients=6, executors=executors, seed=5, holdout=0.3)
        parts = ft.split_indices(y, 6, seed=5)
        for index, (shard, part) in enumerate(zip(clients.shards, parts, strict=True)):
            # as ft.federate(..., holdout=0.3) splits worker `index`'s shard
            train, held = holdout_split(len(part), 0.3, seed=5, index=index)
            assert (shard.size, shard.eval_size) == (7, 3)
            assert torch.equal(await shard.data.fetch(free=True), x[part][train])
            assert torch.equal(await shard.targets.fetch(free=True), y[part][train])
            assert torch.equal(await shard.eval_data.fetch(free=True), x[part][held])
            assert torch.equal(await shard.eval_targets.fetch(free=True), y[part][held])
        plain = ft.simulate_clients((x, y), clients=6, executors=executors, seed=5)
        assert all(s.eval_data is None and s.eval_size == 0 for s in plain.shards)
        clients.close()
        plain.close()


async def test_a_client_cannot_set_the_step_delay_of_local_updates() -> None:
    from fedtensor.client.pointer import call_on
    from fedtensor.federated.trace import trace

    x, y = _data(20)
    model = _model()
    plan = trace(model, torch.nn.functional.cross_entropy, (x[:4], y[:4])).wire
    async with _executors(1) as (executor,):
        client = executor.client
        args = (client.store(plan), client.store(model.state_dict()), client.store(x))
        args += (client.store(y), [[0, 20, 1]])
        with pytest.raises(ft.RemoteError, match="step_delay is the worker's setting"):
            await call_on(client, "fedtensor.local_updates", args, {"step_delay": 0.0}).get()
        with pytest.raises(ft.RemoteError, match="not within the 20 examples"):
            await call_on(client, "fedtensor.local_updates", (*args[:4], [[0, 21, 1]]), {}).get()
        replies = await call_on(client, "fedtensor.local_updates", args, {"lr": 0.1}).get()
        assert [reply["examples"] for reply in replies] == [20]
