"""FedBuff/FedAsync when a worker dies: dropped without stalling the buffer, and taken
back once it can rejoin (a worker process that is killed, virtual workers that are not; the
Ray case is in test_ray_workers.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import torch

import fedtensor as ft
from fedtensor.client.handles import RemoteWorker
from fedtensor.testing import WorkerProcess

pytestmark = pytest.mark.anyio


def _data(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    examples = torch.randn(count, 3, generator=generator)
    return examples, (examples[:, 0] > 0).long()


async def test_a_dead_worker_is_dropped_and_the_buffer_keeps_filling(
    ft_worker_processes: Callable[..., WorkerProcess],
) -> None:
    # The victim is slow, so its update is surely in flight when it is killed: the
    # update fails at once (the connection drops), not after the handle's 60 s.
    process = ft_worker_processes("victim", "--threads", "1", "--step-delay", "0.2")
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(ft.VirtualWorker("a")),
            await stack.enter_async_context(ft.VirtualWorker("b")),
            await stack.enter_async_context(
                ft.connect(process.url, token=process.token, timeout=60)
            ),
        ]
        data = ft.federate(_data(96), workers, seed=0)

        def on_round(metrics: ft.RoundMetrics) -> None:
            if metrics.round == 1:
                process.kill()  # waits (bounded) until the process has ended

        with anyio.fail_after(30):
            history = await ft.fit(
                torch.nn.Linear(3, 2), data, rounds=12, strategy=ft.FedBuff(buffer_size=2),
                batch_size=8, progress=False, on_round=on_round,
            )  # fmt: skip
        assert [m.round for m in history] == list(range(1, 13))  # every version was made
        dropped = next(m.round for m in history if "victim" in m.failed)
        assert history[dropped - 1].failed["victim"].startswith("unavailable")
        # never sent work again (a worker process cannot come back), and no failure repeats
        assert all("victim" not in m.arrivals for m in history[dropped - 1 :])
        assert all(not m.failed for m in history[dropped:])
        assert set(history.arrival_order()[-6:]) == {"a", "b"}
        del data


class _Restartable(RemoteWorker):
    """A worker handle that can come back: ``rejoin()`` connects to a replacement process
    once the test has started one (as a Ray worker does once Ray restarted its actor)."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(url, timeout=60)
        self.token = token
        self.replacement: WorkerProcess | None = None
        self.asked = 0

    async def rejoin(self) -> bool:
        self.asked += 1
        if self._client is not None and self._client.available:
            return True
        if self.replacement is None:
            return False  # still restarting
        await self._client_closed()
        self.url = self.replacement.url
        await self._open_client(self.url, token=self.replacement.token)
        return True

    async def _client_closed(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def test_a_worker_that_comes_back_trains_again_with_its_shard_sent_again(
    ft_worker_processes: Callable[..., WorkerProcess],
) -> None:
    token = "t" * 32
    first = ft_worker_processes("back", "--threads", "1", "--step-delay", "0.2", token=token)
    victim = _Restartable(first.url, token)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(await victim.open(token=token))
        survivor = await stack.enter_async_context(ft.VirtualWorker("other"))
        data = ft.federate(_data(64), [survivor, victim], seed=0)
        assert data.shards[1].reload is not None  # a copy kept: it can come back
        sent = await data.shards[1].data
        events: dict[str, int] = {}

        def on_round(metrics: ft.RoundMetrics) -> None:
            if metrics.round == 1:
                first.kill()  # waits (bounded) until the process has ended
            elif "back" in metrics.failed:
                events["dropped"] = metrics.round
            elif metrics.round == events.get("dropped", -9) + 3:
                # The replacement starts three versions later: those are made by the
                # other worker alone (the buffer does not wait for the dead one).
                victim.replacement = ft_worker_processes("back", "--threads", "1", token=token)
                events["restarted"] = metrics.round

        options: dict[str, Any] = {"batch_size": 8, "progress": False, "on_round": on_round}
        with anyio.fail_after(40):
            history = await ft.fit(
                torch.nn.Linear(3, 2), data, rounds=30,
                strategy=ft.FedBuff(buffer_size=1, concurrency=1), **options,
            )  # fmt: skip
        assert [m.round for m in history] == list(range(1, 31))
        dropped = next(m.round for m in history if "back" in m.failed)
        assert history[dropped - 1].failed["back"].startswith("unavailable")
        restarted = events["restarted"]
        assert restarted == dropped + 3
        back = [m.round for m in history if m.round > restarted and "back" in m.arrivals]
        assert back, [(m.round, m.arrivals, m.failed) for m in history]
        assert victim.asked >= 3  # asked after updates while away, never waited for
        away = [m for m in history if dropped < m.round <= restarted]
        assert all(m.arrivals == ("other",) for m in away)
        # the replacement holds exactly the examples first sent to it, in the data set
        assert torch.equal(await data.shards[1].data, sent)
        del data


async def test_an_asynchronous_run_over_simulated_clients_names_each_client() -> None:
    # Simulated clients share their executor: the run tells them apart by their own
    # names (not the executor's id), and their executor's plan is stored there once.
    async with ft.VirtualWorker("e0") as e0, ft.VirtualWorker("e1") as e1:
        clients = ft.simulate_clients(_data(64), clients=8, executors=[e0, e1], seed=0)
        history = await ft.fit(
            torch.nn.Linear(3, 2), clients, rounds=4, batch_size=8, progress=False,
            strategy=ft.FedBuff(buffer_size=2, concurrency=4),
        )  # fmt: skip
        order = history.arrival_order()
        assert len(order) == 8
        assert set(order) <= {f"client-{index}" for index in range(8)}
        assert len(set(order)) > 2  # not two executor ids
        clients.close()
