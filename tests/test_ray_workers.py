"""ft.ray.workers: fedtensor workers as Ray actors, on a local Ray instance (2 CPUs)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import fedtensor as ft
from fedtensor.ray import PLAIN_TYPES, WorkerActor, _crossing

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fedtensor[ray]')")

pytestmark = pytest.mark.anyio


class _KillThenAwaitRestart:
    """An ``on_round`` that kills the victim's actor after round 1, then waits (bounded)
    for Ray's restart once the run reports one of ``names`` failed, so that a test does
    not depend on how many rounds fit while a Python process starts on a busy machine.
    ``restarted`` holds the new process id."""

    def __init__(self, victim: Any, old_pid: int, names: set[str]) -> None:
        self.victim, self.old_pid, self.names = victim, old_pid, names
        self.restarted: list[int] = []

    def __call__(self, metrics: ft.RoundMetrics) -> None:
        if metrics.round == 1:
            os.kill(self.old_pid, signal.SIGKILL)  # mid-fit: before round 2 is queued
        elif self.names & set(metrics.failed) and not self.restarted:
            self.restarted.append(ray.get(self.victim.actor.pid.remote(), timeout=60))


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One local Ray instance for the module: starting Ray costs seconds."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    yield
    ray.shutdown()


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy.pt"
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(40, 3, generator=generator)
    torch.save({"data": data, "targets": (data[:, 0] > 0).long()}, path)
    return path


def _plain(value: object) -> bool:
    if isinstance(value, tuple | list):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return isinstance(value, PLAIN_TYPES)


def test_import_fedtensor_does_not_import_ray() -> None:
    code = "import sys, fedtensor; assert 'ray' not in sys.modules; print(fedtensor.ray.workers)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "function workers" in result.stdout


def test_the_actor_takes_and_gives_plain_values_only() -> None:
    with pytest.raises(TypeError, match="not Tensor"):
        _crossing(("ok", torch.ones(1)))
    with pytest.raises(TypeError, match="not dict"):
        _crossing(((1, {"a": 1}),))
    assert _crossing(("a", b"b", 1, 2.0, True, None, ("x", 3))) == (
        "a",
        b"b",
        1,
        2.0,
        True,
        None,
        ("x", 3),
    )
    plain = {str, bytes, int, float, bool, type(None), tuple[str, ...]}
    for name in ("__init__", "url", "pid", "stop", "echo"):
        hints = typing.get_type_hints(getattr(WorkerActor, name))
        assert set(hints.values()) <= plain, (name, hints)


async def test_ray_workers_compute_federate_fit_and_load_data(
    ray_instance: None, dataset_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spy on everything that crosses Ray: actor creations, method calls, and answers.
    crossed: list[object] = []
    create, call, get = ray.actor.ActorClass._remote, ray.actor.ActorMethod._remote, ray.get

    def spy_create(self: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        crossed.extend([*(args or ()), *(kwargs or {}).values()])
        return create(self, args=args, kwargs=kwargs, **options)

    def spy_call(self: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        crossed.extend([*(args or ()), *(kwargs or {}).values()])
        return call(self, args, kwargs, **options)

    def spy_get(*args: Any, **kwargs: Any) -> Any:
        answer = get(*args, **kwargs)
        crossed.append(answer)
        return answer

    monkeypatch.setattr(ray.actor.ActorClass, "_remote", spy_create)
    monkeypatch.setattr(ray.actor.ActorMethod, "_remote", spy_call)
    monkeypatch.setattr(ray, "get", spy_get)

    group = ft.ray.workers(2, host="127.0.0.1", datasets={"toy": dataset_file}, placement="pack")
    async with group as workers, ft.VirtualWorker("carol") as carol:
        assert [w.id for w in workers] == ["ray-0", "ray-1"]
        assert all(w.url.startswith("ws://127.0.0.1:") for w in workers)
        # pointers, and a multi-pointer mixing Ray and virtual workers
        x = ft.send(torch.arange(4.0), workers[0], workers[1], carol)
        assert torch.equal(await (x + 1).get(sum_results=True), (torch.arange(4.0) + 1) * 3)
        # a data set loaded on the actors' node, never held by this client
        data = await ft.load_dataset(workers, "toy")
        assert data.sizes() == {"ray-0": 40, "ray-1": 40}
        model = torch.nn.Linear(3, 2)
        history = await ft.fit(model, data, rounds=1, batch_size=8, lr=0.5, progress=False)
        assert history[0].completed == ("ray-0", "ray-1")
        del x, data
    assert crossed, "the spy saw nothing: the test would prove nothing"
    assert any(isinstance(value, str) and value.startswith("ws://") for value in crossed)
    assert [value for value in crossed if not _plain(value)] == []


async def test_a_killed_actor_fails_pointers_is_dropped_and_comes_back(
    ray_instance: None, dataset_file: Path
) -> None:
    group = ft.ray.workers(
        2, host="127.0.0.1", datasets={"toy": dataset_file}, max_restarts=1, timeout=30
    )
    async with group as workers:
        victim = workers[1]  # fit learns the data's shape from the first worker's shard
        data = await ft.load_dataset(list(workers), "toy")
        # a fetch in flight (a computation of a second or so) and a pointer not yet awaited
        x = ft.send(torch.randn(1200, 1200), victim)
        y = x
        for _ in range(8):
            y = (y @ x) / 1200
        in_flight = asyncio.ensure_future(y.get())
        waiting = ft.send(torch.ones(3), victim) * 2
        old_url = victim.url
        ray.kill(group.actors[1], no_restart=False)
        # WorkerUnavailable as the connection drops, not TimeoutError after 30 s
        with pytest.raises(ft.WorkerUnavailable):
            await in_flight
        with pytest.raises(ft.WorkerUnavailable):
            await waiting
        # fit drops it for the round and trains on the other
        model = torch.nn.Linear(3, 2)
        history = await ft.fit(model, data, rounds=1, batch_size=8, progress=False)
        assert history[0].completed == ("ray-0",)
        assert "unavailable" in history[0].failed["ray-1"]
        # Ray restarted it: the handle reaches the new, empty worker at its new address
        await victim.reconnect()
        assert victim.url != old_url
        assert await victim.object_ids() == []
        assert torch.equal(await (ft.send(torch.ones(2), victim) + 1).get(), torch.full((2,), 2.0))
        # its data set was loaded again on its node: sampled again in the next run
        data = await ft.load_dataset(list(workers), "toy")
        history = await ft.fit(model, data, rounds=1, batch_size=8, progress=False)
        assert history[0].completed == ("ray-0", "ray-1")
        del x, y, data


async def test_a_restarted_actor_rejoins_the_fit_under_way(
    ray_instance: None, dataset_file: Path
) -> None:
    group = ft.ray.workers(
        2, host="127.0.0.1", datasets={"toy": dataset_file}, max_restarts=1, timeout=30
    )
    async with group as workers:
        victim = workers[1]
        old_pid = await victim.actor.pid.remote()
        data = await ft.load_dataset(list(workers), "toy", holdout=0.25)
        on_round = _KillThenAwaitRestart(victim, old_pid, {"ray-1"})
        restarted = on_round.restarted

        model = torch.nn.Linear(3, 2)
        history = await ft.fit(
            model, data, rounds=8, batch_size=8, progress=False, on_round=on_round,
            evaluate_fraction=1.0,
        )  # fmt: skip
        assert history[0].completed == ("ray-0", "ray-1")
        dropped = next(m.round for m in history if "ray-1" in m.failed)
        assert history[dropped - 1].failed["ray-1"].startswith("unavailable")
        assert restarted
        assert restarted[0] != old_pid  # Ray started a new process
        back = [m.round for m in history if m.round > dropped and "ray-1" in m.completed]
        assert back, [(m.round, m.sampled, m.failed) for m in history]
        # while it was away it was not sampled; once back, it trained every round
        away = [m for m in history if dropped < m.round < back[0]]
        assert all(m.sampled == ("ray-0",) for m in away)
        assert all(m.completed == ("ray-0", "ray-1") for m in history if m.round >= back[0])
        # its data set was loaded again on the new worker (same split), in `data` itself
        assert data.sizes() == {"ray-0": 30, "ray-1": 30}
        assert history[-1].client_eval["ray-1"][2] == 10
        del data


async def test_a_restarted_actor_gets_the_shard_this_client_sent_again(ray_instance: None) -> None:
    # ft.federate's data came from this client: the restarted (empty) worker gets its
    # shard sent again from the copy kept for a worker that can come back, and trains.
    generator = torch.Generator().manual_seed(0)
    examples = torch.randn(40, 3, generator=generator)
    labels = torch.randint(0, 2, (40,), generator=generator)
    group = ft.ray.workers(2, host="127.0.0.1", max_restarts=1, timeout=30)
    async with group as workers:
        victim = workers[1]
        old_pid = await victim.actor.pid.remote()
        data = ft.federate((examples, labels), list(workers), seed=0, holdout=0.25)
        sizes = data.sizes()
        assert all(shard.reload is not None for shard in data.shards)
        sent = await data.shards[1].data  # a copy of what worker 1 holds
        on_round = _KillThenAwaitRestart(victim, old_pid, {"ray-1"})
        restarted = on_round.restarted

        model = torch.nn.Linear(3, 2)
        history = await ft.fit(
            model, data, rounds=8, batch_size=8, progress=False, on_round=on_round,
            evaluate_fraction=1.0,
        )  # fmt: skip
        dropped = next(m.round for m in history if "ray-1" in m.failed)
        assert restarted
        assert restarted[0] != old_pid
        back = [m.round for m in history if m.round > dropped and "ray-1" in m.completed]
        assert back, [(m.round, m.sampled, m.failed) for m in history]
        assert data.sizes() == sizes  # the same split, sent again
        # the new worker holds exactly the examples first sent to it
        assert torch.equal(await data.shards[1].data, sent)
        assert history[-1].client_eval["ray-1"][2] == data.shards[1].eval_size
        del data


async def test_fit_starts_when_the_first_worker_is_dead(
    ray_instance: None, dataset_file: Path
) -> None:
    async with ft.ray.workers(2, host="127.0.0.1", datasets={"toy": dataset_file}) as workers:
        data = await ft.load_dataset(list(workers), "toy")  # shapes unknown here
        pid = await asyncio.wrap_future(workers[0].actor.pid.remote().future())
        process = os.pidfd_open(pid)  # readable once that process has ended
        try:
            ray.kill(workers[0].actor, no_restart=True)
            # ray.kill returns at once: wait until the actor's process has ended, so that
            # the command below cannot be answered by a worker still alive.
            ended, _, _ = await asyncio.to_thread(select.select, [process], [], [], 30)
            assert ended, "the killed actor's process did not end within 30 s"
        finally:
            os.close(process)
        with pytest.raises(ft.WorkerUnavailable):  # the connection is seen gone
            await (ft.send(torch.ones(1), workers[0]) + 1).get()
        model = torch.nn.Linear(3, 2)
        history = await ft.fit(model, data, rounds=2, batch_size=8, progress=False)
        assert history[0].failed["ray-0"].startswith("unavailable")
        assert history[0].completed == ("ray-1",)
        assert history[1].sampled == ("ray-1",)  # dropped for good: no restarts
        del data


async def test_a_restarted_executor_gets_its_block_again_and_its_clients_rejoin(
    ray_instance: None,
) -> None:
    # Simulated clients on Ray executors: the restarted (empty) executor is sent its
    # block again from the copy kept for an executor that can come back; its clients
    # are sampled again, and train as in a run where the executor never died.
    generator = torch.Generator().manual_seed(0)
    examples = torch.randn(96, 3, generator=generator)
    labels = (examples[:, 0] > 0).long()
    torch.manual_seed(0)
    start = torch.nn.Linear(3, 2).state_dict()
    options: dict[str, Any] = {"batch_size": 8, "lr": 0.5, "progress": False}

    def model() -> torch.nn.Module:
        fresh = torch.nn.Linear(3, 2)
        fresh.load_state_dict(start)
        return fresh

    group = ft.ray.workers(2, host="127.0.0.1", max_restarts=1, timeout=30)
    async with group as executors:
        victim = executors[1]
        old_pid = await victim.actor.pid.remote()
        clients = ft.simulate_clients(
            (examples, labels), clients=8, executors=list(executors), seed=0, holdout=0.25
        )
        on_victim = {shard.name for shard in clients.shards if shard.worker is victim}
        assert len(on_victim) == 4
        # The run where nothing died, and one full round: the references.
        reference = await ft.fit(model(), clients, rounds=8, fraction=0.5, **options)
        one_round = model()
        await ft.fit(one_round, clients, rounds=1, **options)
        on_round = _KillThenAwaitRestart(victim, old_pid, on_victim)
        restarted = on_round.restarted

        with anyio.fail_after(120):
            history = await ft.fit(
                model(), clients, rounds=8, fraction=0.5, on_round=on_round,
                evaluate_fraction=1.0, **options,
            )  # fmt: skip
        dropped = next(m.round for m in history if on_victim & set(m.failed))
        assert all(
            history[dropped - 1].failed[name].startswith("unavailable")
            for name in on_victim & set(history[dropped - 1].failed)
        )
        assert restarted
        assert restarted[0] != old_pid  # Ray started a new process
        back = [m.round for m in history if m.round > dropped and on_victim & set(m.completed)]
        assert back, [(m.round, m.sampled, m.failed) for m in history]
        # While away its clients gave no update; from its return on, every round samples
        # what the run where it never died sampled, and all of them train.
        assert all(
            not on_victim & set(m.completed) for m in history if m.round < back[0] and m.round > 1
        )
        for metrics in history[back[0] - 1 :]:
            assert metrics.sampled == reference[metrics.round - 1].sampled
            assert metrics.completed == metrics.sampled
            assert not metrics.failed
        # The block sent again holds the same rows: its held-out rows are evaluated...
        assert {name: result[2] for name, result in history[-1].client_eval.items()} == {
            shard.name: shard.eval_size for shard in clients.shards
        }
        # ...and a full round from the same start gives the very weights it gave before.
        again = model()
        await ft.fit(again, clients, rounds=1, **options)
        for key, value in one_round.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key
        del clients


async def test_a_restarted_actor_rejoins_an_asynchronous_run(ray_instance: None) -> None:
    # FedBuff: the killed worker is dropped (recorded in a version's `failed`), the
    # other keeps the buffer filling, and the restarted worker gets its shard sent
    # again and trains again (its updates in `arrivals`).
    generator = torch.Generator().manual_seed(0)
    examples = torch.randn(64, 3, generator=generator)
    labels = (examples[:, 0] > 0).long()
    group = ft.ray.workers(2, host="127.0.0.1", max_restarts=1, timeout=30)
    async with group as workers:
        victim = workers[1]
        old_pid = await victim.actor.pid.remote()
        data = ft.federate((examples, labels), list(workers), seed=0)
        sent = await data.shards[1].data  # a copy of what worker 1 holds
        on_round = _KillThenAwaitRestart(victim, old_pid, {"ray-1"})
        restarted = on_round.restarted

        # One update in flight at a time: each refill picks one of the idle workers
        # (seeded), so once back the restarted worker is soon picked, and waited for.
        strategy = ft.FedBuff(buffer_size=1, concurrency=1)
        with anyio.fail_after(60):
            history = await ft.fit(
                torch.nn.Linear(3, 2), data, rounds=24, strategy=strategy, batch_size=8,
                progress=False, on_round=on_round,
            )  # fmt: skip
        assert [m.round for m in history] == list(range(1, 25))  # every version was made
        dropped = next(m.round for m in history if "ray-1" in m.failed)
        assert history[dropped - 1].failed["ray-1"].startswith("unavailable")
        assert restarted
        assert restarted[0] != old_pid
        back = [m.round for m in history if m.round > dropped and "ray-1" in m.arrivals]
        assert back, [(m.round, m.arrivals, m.failed) for m in history]
        # the new worker holds exactly the examples first sent to it
        assert torch.equal(await data.shards[1].data, sent)
        del data
