"""Asynchronous training: FedBuff and FedAsync on hand-made arrival orders, versions and
staleness in the history, checkpoints, and slow workers (``step_delay``)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import fedtensor as ft
from fedtensor.client.pointer import call_on
from fedtensor.demo import train_centrally
from fedtensor.federated.asynchronous import update_seed
from fedtensor.testing import WorkerFactory, WorkerProcess

pytestmark = pytest.mark.anyio

State = dict[str, torch.Tensor]
LR, BATCH, SEED = 0.1, 16, 3


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def _data(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 8, 8, generator=generator), torch.randint(
        0, 10, (count,), generator=generator
    )


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny()


def _state(model: nn.Module) -> State:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _close(a: State, b: State, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[key].double(), b[key].double(), atol=atol) for key in a
    )


def _trained(start: State, part: tuple[torch.Tensor, torch.Tensor], update: int) -> State:
    """What local update number ``update`` makes of ``start`` on ``part``, computed here."""
    local = _model()
    local.load_state_dict(start)
    train_centrally(local, part, seed=update_seed(SEED, update), epochs=1, lr=LR, batch_size=BATCH)
    return _state(local)


def _combine(*terms: tuple[float, State]) -> State:
    """sum of weight * state, entry by entry, in float64."""
    keys = terms[0][1].keys()
    return {k: sum(w * s[k].double() for w, s in terms).float() for k in keys}  # type: ignore[misc]


async def _three(factory: WorkerFactory) -> tuple[ft.FederatedDataset, list[Any]]:
    workers = [await factory(name) for name in ("a", "b", "c")]
    data = _data(96)
    parts = [(data[0][i * 32 : (i + 1) * 32], data[1][i * 32 : (i + 1) * 32]) for i in range(3)]
    federated = ft.FederatedDataset(
        [
            ft.Shard(worker, ft.send(part[0], worker), ft.send(part[1], worker), 32)
            for worker, part in zip(workers, parts, strict=True)
        ]
    )
    return federated, parts


def test_staleness_functions_follow_their_formulas() -> None:
    polynomial, hinge, constant = (
        ft.Staleness("polynomial", a=0.5),
        ft.Staleness("hinge", a=10, b=4),
        ft.Staleness("constant"),
    )
    assert [polynomial(s) for s in (0, 3, 8)] == pytest.approx([1, 0.5, 1 / 3])
    assert [hinge(s) for s in (0, 4, 5, 6)] == pytest.approx([1, 1, 1 / 11, 1 / 21])
    assert [constant(s) for s in (0, 100)] == [1, 1]
    assert ft.FedBuff(staleness="hinge").staleness == ft.Staleness("hinge", a=10, b=4)
    with pytest.raises(ValueError, match="staleness must be one of"):
        ft.Staleness("exponential")
    with pytest.raises(ValueError, match="buffer_size"):
        ft.FedBuff(buffer_size=0)
    with pytest.raises(ValueError, match="alpha"):
        ft.FedAsync(alpha=1.5)


async def test_fedbuff_weights_updates_by_staleness_as_the_formula_says(
    ft_virtual_workers: WorkerFactory,
) -> None:
    federated, parts = await _three(ft_virtual_workers)
    a, b, c = parts
    server_lr = 0.8
    model = _model()
    x0 = _state(model)
    order = ["a", "b", "a", "b", "c", "a"]
    history = await ft.fit(
        model, federated, rounds=3, lr=LR, batch_size=BATCH, seed=SEED, progress=False,
        strategy=ft.FedBuff(buffer_size=2, staleness="polynomial", server_lr=server_lr),
        arrival_order=order,
    )  # fmt: skip
    del federated
    # By hand. Updates are numbered as sent: a, b, c get 0, 1, 2 from version 0 (x0); each
    # worker is sent the newest model as soon as its update is taken.
    s = ft.Staleness("polynomial", a=0.5)
    k = server_lr / 2
    y0, y1, y2 = _trained(x0, a, 0), _trained(x0, b, 1), _trained(x0, c, 2)
    # a(0, stale 0), then a gets update 3 on x0; b(1, stale 0): version 1.
    y3 = _trained(x0, a, 3)
    x1 = _combine((1, x0), (k * s(0), y0), (-k * s(0), x0), (k * s(0), y1), (-k * s(0), x0))
    # b gets 4 on x1; a(3 from x0, stale 1), a gets 5 on x1; b(4 from x1, stale 0): version 2.
    y4, y5 = _trained(x1, b, 4), _trained(x1, a, 5)
    x2 = _combine((1, x1), (k * s(1), y3), (-k * s(1), x0), (k * s(0), y4), (-k * s(0), x1))
    # b gets 6 on x2; c(2 from x0, stale 2), c gets 7 on x2; a(5 from x1, stale 1): version 3.
    x3 = _combine((1, x2), (k * s(2), y2), (-k * s(2), x0), (k * s(1), y5), (-k * s(1), x1))
    assert _close(model.state_dict(), x3, atol=1e-5)
    assert [m.round for m in history] == [1, 2, 3]
    assert [m.arrivals for m in history] == [("a", "b"), ("a", "b"), ("c", "a")]
    assert [m.staleness for m in history] == [(0, 0), (1, 0), (2, 1)]
    assert [m.base_versions for m in history] == [(0, 0), (0, 1), (0, 1)]
    assert history.arrival_order() == order
    assert all(len(m.arrival_seconds) == 2 for m in history)
    # The check can fail: without the staleness weights the model is another one.
    unweighted = _combine((1, x2), (k, y2), (-k, x0), (k, y5), (-k, x1))
    assert not _close(model.state_dict(), unweighted, atol=1e-5)


async def test_fedasync_mixes_each_update_in_by_its_staleness(
    ft_virtual_workers: WorkerFactory,
) -> None:
    federated, parts = await _three(ft_virtual_workers)
    a, b, c = parts
    alpha = 0.5
    model = _model()
    x0 = _state(model)
    history = await ft.fit(
        model, federated, rounds=4, lr=LR, batch_size=BATCH, seed=SEED, progress=False,
        strategy=ft.FedAsync(alpha=alpha, staleness=ft.Staleness("hinge", a=10, b=1)),
        arrival_order=["a", "b", "c", "a"],
    )  # fmt: skip
    del federated
    s = ft.Staleness("hinge", a=10, b=1)

    def mix(current: State, update: State, staleness: int) -> State:
        weight = alpha * s(staleness)
        return _combine((1 - weight, current), (weight, update))

    x1 = mix(x0, _trained(x0, a, 0), 0)  # a gets update 3 on x1
    x2 = mix(x1, _trained(x0, b, 1), 1)
    x3 = mix(x2, _trained(x0, c, 2), 2)  # hinge: 1 / 11
    x4 = mix(x3, _trained(x1, a, 3), 2)
    assert _close(model.state_dict(), x4, atol=1e-5)
    assert [m.staleness for m in history] == [(0,), (1,), (2,), (2,)]
    assert [m.base_versions for m in history] == [(0,), (0,), (0,), (1,)]


async def test_resuming_an_asynchronous_run_gives_the_uninterrupted_weights(
    ft_virtual_workers: WorkerFactory, tmp_path: Path
) -> None:
    federated, _ = await _three(ft_virtual_workers)
    options: dict[str, Any] = {"lr": LR, "batch_size": BATCH, "seed": SEED, "progress": False}

    def strategy() -> ft.FedBuff:  # 2 of the 3 workers busy at a time: a sampled choice
        return ft.FedBuff(buffer_size=2, concurrency=2, server_lr=0.9)

    live = await ft.fit(_model(), federated, rounds=5, strategy=strategy(), **options)
    order = live.arrival_order()
    assert len(set(order)) == 3
    straight = _model()
    whole = await ft.fit(
        straight, federated, rounds=5, strategy=strategy(), arrival_order=order, **options
    )
    checkpoint = tmp_path / "run.pt"
    await ft.fit(
        _model(), federated, rounds=2, strategy=strategy(), arrival_order=order,
        checkpoint=checkpoint, **options,
    )  # fmt: skip
    resumed = _model(seed=9)  # whatever it starts as, the checkpoint sets it
    history = await ft.fit(
        resumed, federated, rounds=5, strategy=strategy(), arrival_order=order,
        checkpoint=checkpoint, resume=True, **options,
    )  # fmt: skip
    del federated
    assert [m.round for m in history] == [1, 2, 3, 4, 5]
    assert history.arrival_order() == whole.arrival_order() == order
    assert [m.staleness for m in history] == [m.staleness for m in whole]
    assert _close(resumed.state_dict(), straight.state_dict(), atol=0.0)


async def test_a_live_run_over_slow_worker_processes_records_and_replays_its_order(
    ft_worker_processes: Callable[..., WorkerProcess],
) -> None:
    processes = [
        ft_worker_processes("fast", "--threads", "1"),
        ft_worker_processes("slow", "--threads", "1", "--step-delay", "0.5"),
    ]
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(ft.connect(p.url, token=p.token, timeout=60))
            for p in processes
        ]
        federated = ft.federate(_data(64), workers, seed=0)
        options: dict[str, Any] = {"lr": LR, "batch_size": BATCH, "seed": SEED}
        live = _model()
        lines = io.StringIO()
        with anyio.fail_after(60):
            history = await ft.fit(
                live, federated, rounds=3, strategy=ft.FedBuff(buffer_size=2), progress=lines,
                **options,
            )  # fmt: skip
        order = history.arrival_order()
        # The slow worker takes at least 1 s an update (2 steps, 0.5 s after each), the fast
        # one milliseconds: most updates are the fast one's, as the run did not wait.
        assert len(order) == 6
        assert order.count("fast") >= 4
        assert [m.round for m in history] == [1, 2, 3]
        assert all(s >= 0 for m in history for s in m.staleness)
        assert "staleness " in lines.getvalue()
        replayed = _model()
        with anyio.fail_after(60):
            await ft.fit(
                replayed, federated, rounds=3, strategy=ft.FedBuff(buffer_size=2),
                arrival_order=order, progress=False, **options,
            )  # fmt: skip
        assert _close(replayed.state_dict(), live.state_dict(), atol=0.0)
        del federated


async def test_step_delay_slows_each_local_step_and_is_the_workers_setting(
    ft_virtual_workers: WorkerFactory,
) -> None:
    slow = await ft_virtual_workers("slow", step_delay=0.05)
    model = _model()
    plan = ft.trace(model, torch.nn.functional.cross_entropy, _data(2))
    client = slow.client
    stored_plan, state = client.store(plan.wire), client.store(_state(model))
    x, y = ft.send(_data(48)[0], slow), ft.send(_data(48)[1], slow)
    update = call_on(
        client, "fedtensor.local_update", (stored_plan, state, x, y), {"batch_size": 16}
    )
    reply = await update.fetch(free=True)
    assert reply["seconds"] >= 3 * 0.05  # 3 batches of 16, each followed by its delay
    refused = call_on(
        client, "fedtensor.local_update", (stored_plan, state, x, y), {"step_delay": 0.0}
    )
    with pytest.raises(ft.RemoteError, match="step_delay is the worker's setting"):
        await refused.fetch(free=True)
    with pytest.raises(ValueError, match="step_delay"):
        ft.VirtualWorker("negative", step_delay=-1)
    del stored_plan, state, x, y, update, refused


async def test_asynchronous_arguments_are_checked(ft_virtual_workers: WorkerFactory) -> None:
    federated, _ = await _three(ft_virtual_workers)
    with pytest.raises(ValueError, match="arrival_order is for asynchronous"):
        await ft.fit(_model(), federated, rounds=1, arrival_order=["a"], progress=False)
    with pytest.raises(ValueError, match="names 'zed'"):
        await ft.fit(
            _model(), federated, rounds=1, strategy=ft.FedBuff(buffer_size=1),
            arrival_order=["zed"], progress=False,
        )  # fmt: skip
    # Privacy is not silently dropped: an asynchronous run has no private aggregation.
    with pytest.raises(ValueError, match="synchronous strategies only"):
        await ft.fit(
            _model(), federated, rounds=1, strategy=ft.FedBuff(buffer_size=1),
            dp=ft.CentralDP(noise_multiplier=1.0), progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="sampling is for synchronous strategies"):
        await ft.fit(
            _model(), federated, rounds=1, strategy=ft.FedBuff(buffer_size=1),
            sampling="stratified", progress=False,
        )  # fmt: skip
    del federated


def test_a_worker_refuses_a_negative_step_delay(capsys: pytest.CaptureFixture[str]) -> None:
    from fedtensor.cli import main

    assert main(["worker", "--id", "w", "--no-auth", "--step-delay", "-1"]) == 2
    assert "--step-delay must be at least 0" in capsys.readouterr().err
