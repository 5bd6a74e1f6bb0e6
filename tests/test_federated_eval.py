"""Federated evaluation: held-out parts on the workers, ``fedtensor.evaluate``, and the
per-client distribution that ``ft.fit(evaluate_fraction=..., evaluate_every=...)`` records."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedtensor as ft
from fedtensor.client.pointer import call_on
from fedtensor.federated.datasets import holdout_split
from fedtensor.federated.evaluation import FederatedEvaluator
from fedtensor.testing import WorkerFactory

pytestmark = pytest.mark.anyio


class Normed(nn.Module):
    """Dropout and a batch norm: evaluation mode changes what the forward pass computes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.norm(self.fc1(x.flatten(1))))))  # type: ignore[no-any-return]


def _data(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 1, 8, 8, generator=generator)
    y = (x.flatten(1)[:, :10].argmax(1) + torch.randint(0, 2, (count,), generator=generator)) % 10
    return x, y


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Normed()


def _held_out(
    data: tuple[torch.Tensor, torch.Tensor], workers: int, holdout: float, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each worker's held-out part, computed here as ft.federate splits it."""
    x, y = data
    parts = ft.split_indices(y, workers, seed=seed)
    held = []
    for index, part in enumerate(parts):
        _, out = holdout_split(len(part), holdout, seed=seed, index=index)
        held.append((x[part][out], y[part][out]))
    return held


async def test_client_figures_equal_a_local_evaluation_of_the_same_model(
    ft_workers: WorkerFactory,
) -> None:
    names = ["bob", "alice"]  # over websockets: the worker processes other tests use too
    workers = [await ft_workers(name) for name in names]
    data = _data(100)
    federated = ft.federate(data, workers, seed=3, holdout=0.2)
    held = _held_out(data, 2, 0.2, seed=3)
    model = _model()
    states: list[dict[str, torch.Tensor]] = []
    history = await ft.fit(
        model, federated, rounds=2, lr=0.1, batch_size=16, seed=1, progress=False,
        evaluate_fraction=1.0, on_round=lambda _: states.append(
            {k: v.clone() for k, v in model.state_dict().items()}
        ),
    )  # fmt: skip
    del federated
    for metrics, state in zip(history, states, strict=True):
        local = _model()
        local.load_state_dict(state)
        expected = {name: ft.evaluate(local, *part) for name, part in zip(names, held, strict=True)}
        assert metrics.client_eval.keys() == expected.keys()
        for name, (loss, accuracy) in expected.items():
            got_loss, got_accuracy, examples = metrics.client_eval[name]
            assert got_loss == pytest.approx(loss, rel=1e-5)
            assert got_accuracy == pytest.approx(accuracy)
            assert examples == len(held[names.index(name)][0])
        sizes = [len(part[0]) for part in held]
        losses = [expected[name][0] for name in names]
        accuracies = [expected[name][1] for name in names]
        weighted_loss = sum(v * n for v, n in zip(losses, sizes, strict=True)) / sum(sizes)
        weighted_accuracy = sum(a * n for a, n in zip(accuracies, sizes, strict=True)) / sum(sizes)
        assert metrics.client_eval_loss == pytest.approx(weighted_loss, rel=1e-5)
        assert metrics.client_eval_accuracy == pytest.approx(weighted_accuracy)
        got = [metrics.client_eval[name] for name in names]
        for field, values in (
            ("client_eval_loss_quantiles", [v[0] for v in got]),
            ("client_eval_accuracy_quantiles", [v[1] for v in got]),
        ):
            quantiles = torch.quantile(
                torch.tensor(values, dtype=torch.float64),
                torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64),
            ).tolist()
            assert getattr(metrics, field) == pytest.approx(quantiles)
    # The check can fail: the same model in training mode (dropout, batch statistics)
    # gives other figures.
    local = _model()
    local.load_state_dict(states[-1])
    torch.manual_seed(0)
    with torch.no_grad():
        train_mode_loss = float(F.cross_entropy(local.train()(held[0][0]), held[0][1]))
    assert history[-1].client_eval["bob"][0] != pytest.approx(train_mode_loss, rel=1e-3)


async def test_evaluation_samples_a_fraction_reproducibly_every_few_rounds(
    ft_virtual_workers: WorkerFactory,
) -> None:
    workers = [await ft_virtual_workers(f"w{i}") for i in range(6)]
    federated = ft.federate(_data(120), workers, seed=0, holdout=0.25)
    runs = {}
    for seed in (0, 0, 1):
        history = await ft.fit(
            _model(), federated, rounds=4, lr=0.1, seed=seed, progress=False,
            evaluate_fraction=0.5, evaluate_every=2,
        )  # fmt: skip
        assert [bool(m.client_eval) for m in history] == [False, True, False, True]
        assert all(math.isnan(m.client_eval_accuracy) for m in history[::2])
        picked = [tuple(sorted(m.client_eval)) for m in history[1::2]]
        assert all(len(names) == 3 for names in picked)
        runs.setdefault(seed, []).append(picked)
    assert runs[0][0] == runs[0][1]  # the same seed picks the same clients
    assert runs[1][0] != runs[0][0]  # another seed, others
    evaluator = FederatedEvaluator(
        _model(), F.cross_entropy, federated, None, fraction=0.5, every=2, seed=0
    )
    assert [tuple(f"w{i}" for i in evaluator.sample(r)) for r in (2, 4)] == runs[0][0]
    evaluator.close()
    del federated


async def test_holdout_keeps_examples_out_of_training_on_each_worker(
    ft_virtual_workers: WorkerFactory,
) -> None:
    x, y = torch.arange(40.0).reshape(40, 1), torch.arange(40) % 10
    workers = [await ft_virtual_workers(name) for name in ("a", "b")]
    federated = ft.federate((x, y), workers, seed=2, holdout=0.3)
    parts = ft.split_indices(y, 2, seed=2)
    for index, (shard, part) in enumerate(zip(federated, parts, strict=True)):
        train = (await shard.data.fetch()).flatten().tolist()
        held = (await shard.eval_data.fetch()).flatten().tolist()
        assert not set(train) & set(held)
        assert sorted(train + held) == x[part].flatten().tolist()
        assert (shard.size, shard.eval_size) == (len(train), len(held)) == (14, 6)
        _, out = holdout_split(len(part), 0.3, seed=2, index=index)
        assert held == x[part][out].flatten().tolist()
    again = ft.federate((x, y), workers, seed=2, holdout=0.3)  # the same call, the same split
    for first, second in zip(federated, again, strict=True):
        assert torch.equal(await first.eval_data.fetch(), await second.eval_data.fetch())
    with pytest.raises(ValueError, match="holdout"):
        ft.federate((x, y), workers, holdout=1.0)
    del federated, again


async def test_a_data_set_the_workers_hold_is_split_on_the_workers(ft_encode: bool) -> None:
    x, y = torch.arange(20.0).reshape(20, 1), torch.arange(20) % 10
    async with ft.VirtualWorker("keeper", datasets={"digits": (x, y)}, encode=ft_encode) as w:
        federated = await ft.load_dataset([w], "digits", holdout=0.25, seed=4)
        (shard,) = federated.shards
        kept, out = holdout_split(20, 0.25, seed=4, index=0)
        assert torch.equal(await shard.eval_data.fetch(), x[out])
        assert torch.equal(await shard.eval_targets.fetch(), y[out])
        assert torch.equal(await shard.data.fetch(), x[kept])
        assert (shard.size, shard.eval_size) == (15, 5)
        del federated, shard


async def test_fit_needs_held_out_parts_and_valid_arguments(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob = await ft_virtual_workers("bob")
    plain = ft.federate(_data(20), [bob])
    with pytest.raises(ValueError, match="holdout"):
        await ft.fit(_model(), plain, rounds=1, evaluate_fraction=0.5, progress=False)
    held = ft.federate(_data(20), [bob], holdout=0.2)
    with pytest.raises(ValueError, match="evaluate_fraction"):
        await ft.fit(_model(), held, rounds=1, evaluate_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="evaluate_every"):
        await ft.fit(_model(), held, rounds=1, evaluate_fraction=1, evaluate_every=0)
    del plain, held


async def test_the_worker_operation_is_allow_listed_and_checks_its_input(
    ft_virtual_workers: WorkerFactory,
) -> None:
    assert "fedtensor.evaluate" in ft.allowed_operations()
    bob = await ft_virtual_workers("bob")
    model = _model()
    plan = ft.trace(model, F.cross_entropy, _data(2), training=False)
    x, y = _data(30)
    client = bob.client
    stored_plan = client.store(plan.wire)
    state = client.store({k: v.detach() for k, v in model.state_dict().items()})
    result = call_on(client, "fedtensor.evaluate", (stored_plan, state, x, y), {})
    reply = await result.fetch(free=True)
    loss, accuracy = ft.evaluate(model, x, y)
    assert reply["examples"] == 30
    assert reply["loss_sum"] / 30 == pytest.approx(loss, rel=1e-5)
    assert reply["correct"] / 30 == pytest.approx(accuracy)
    bad = call_on(client, "fedtensor.evaluate", (stored_plan, state, x, y[:5]), {})
    with pytest.raises(ft.RemoteError, match="30 examples but 5 labels"):
        await bad.fetch(free=True)
    del stored_plan, state, result, bad
    assert await (ft.send(torch.ones(2), bob) * 2).get() == pytest.approx([2.0, 2.0])


async def test_progress_checkpoint_and_plot_show_the_client_distribution(
    ft_virtual_workers: WorkerFactory, tmp_path: Path
) -> None:
    workers = [await ft_virtual_workers(f"w{i}") for i in range(3)]
    federated = ft.federate(_data(90), workers, seed=0, holdout=0.2)
    lines = io.StringIO()
    options: dict[str, Any] = {"lr": 0.1, "evaluate_fraction": 1.0, "seed": 2}
    checkpoint = tmp_path / "run.pt"
    history = await ft.fit(
        _model(), federated, rounds=2, progress=lines, checkpoint=checkpoint, **options
    )
    text = lines.getvalue()
    assert "clients (3) acc" in text
    assert "[p10 " in text
    assert ", p90 " in text
    resumed = await ft.fit(
        _model(), federated, rounds=2, progress=False, checkpoint=checkpoint, resume=True,
        **options,
    )  # fmt: skip
    # Every field, the client figures included (repr: a NaN is not equal to itself).
    assert repr(list(resumed)) == repr(list(history))
    assert resumed[-1].client_eval == history[-1].client_eval
    assert isinstance(resumed[-1].client_eval_accuracy_quantiles, tuple)
    pytest.importorskip("matplotlib")
    target = history.plot(tmp_path / "curves.png")
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    del federated


async def test_simulated_clients_are_evaluated_on_their_own_held_out_rows() -> None:
    data = _data(200)
    held = _held_out(data, 20, 0.2, seed=3)  # as ft.federate holds out a worker's
    options: dict[str, Any] = {
        "rounds": 2, "lr": 0.1, "batch_size": 4, "seed": 1, "progress": False,
        "fraction": 0.5, "evaluate_fraction": 0.5,
    }  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        executors = [await stack.enter_async_context(ft.VirtualWorker(f"e{i}")) for i in (0, 1)]
        workers = [await stack.enter_async_context(ft.VirtualWorker(f"w{i}")) for i in range(20)]
        clients = ft.simulate_clients(data, clients=20, executors=executors, seed=3, holdout=0.2)
        assert [shard.eval_size for shard in clients] == [len(part[0]) for part in held]
        assert len(clients) == 200 - sum(len(part[0]) for part in held)
        model, states = _model(), []
        history = await ft.fit(
            model, clients,
            on_round=lambda _: states.append({k: v.clone() for k, v in model.state_dict().items()}),
            **options,
        )  # fmt: skip
        for metrics, state in zip(history, states, strict=True):
            assert len(metrics.client_eval) == 10  # half of the 20 clients
            local = _model()
            local.load_state_dict(state)
            for name, (loss, accuracy, examples) in metrics.client_eval.items():
                part = held[int(name.removeprefix("client-"))]
                assert (loss, accuracy) == pytest.approx(ft.evaluate(local, *part), rel=1e-5)
                assert examples == len(part[0])
            figures = list(metrics.client_eval.values())
            total = sum(n for _, _, n in figures)
            assert metrics.client_eval_accuracy == pytest.approx(
                sum(a * n for _, a, n in figures) / total
            )
            assert metrics.client_eval_loss_quantiles == pytest.approx(
                torch.quantile(
                    torch.tensor([v[0] for v in figures], dtype=torch.float64),
                    torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64),
                ).tolist()
            )
        # The same run over 20 virtual workers (ft.federate, holdout): the same clients
        # train and are evaluated, with the same figures.
        federated = ft.federate(data, workers, seed=3, holdout=0.2)
        by_workers = await ft.fit(_model(), federated, **options)
        for simulated, real in zip(history, by_workers, strict=True):
            renamed = {f"w{k.removeprefix('client-')}": v for k, v in simulated.client_eval.items()}
            assert renamed.keys() == real.client_eval.keys()
            for name, figures in renamed.items():
                assert figures == pytest.approx(real.client_eval[name], rel=1e-5)
        # One evaluation plan and one copy of the state per executor, not per client.
        evaluator = FederatedEvaluator(model, F.cross_entropy, clients, None, fraction=1.0)
        everyone = await evaluator.evaluate(model, 1)
        assert len(everyone.clients) == 20
        assert not everyone.failed
        assert len(evaluator.plans) == 2
        evaluator.close()
        with pytest.raises(ValueError, match="holdout"):
            ft.simulate_clients(data, clients=4, executors=executors, holdout=1.0)
        clients.close()
        del federated
