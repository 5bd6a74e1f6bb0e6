"""Aggregation strategies against hand computations, and strategies of one's own in `ft.fit`.

The server optimizers are checked over two rounds, where their state (FedAvgM's velocity,
FedAdam's moments) first matters, with values worked out here step by step from the rules
in their papers rather than by calling the code under test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedtensor as ft
from fedtensor.testing import WorkerFactory

pytestmark = pytest.mark.anyio

State = dict[str, torch.Tensor]

PARAMETERS = {"w"}  # "w" is trained; "mean" is a float buffer and "steps" an integer one


def _update(w: list[float], mean: float, steps: int, examples: int, worker: str) -> Any:
    state = {"w": torch.tensor(w), "mean": torch.tensor(mean), "steps": torch.tensor(steps)}
    return ft.Update(worker, state, examples)


# Two rounds of updates from two workers (3 and 1 examples, then 1 and 1).
ROUND_1 = [
    _update([1.0, 2.0, -3.0], 1.0, 6, 3, "a"),
    _update([-1.0, 2.0, 1.0], 5.0, 5, 1, "b"),
]
ROUND_2 = [
    _update([2.0, 0.0, 0.0], 2.0, 9, 1, "a"),
    _update([0.0, 4.0, 2.0], 4.0, 8, 1, "b"),
]
START = {"w": torch.zeros(3), "mean": torch.tensor(0.0), "steps": torch.tensor(4)}
# Their examples-weighted averages, by hand:
AVERAGE_1 = torch.tensor([(3 * 1 - 1) / 4, (3 * 2 + 2) / 4, (3 * -3 + 1) / 4])  # [0.5, 2, -2]
AVERAGE_2 = torch.tensor([1.0, 2.0, 1.0])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-6)


# -- FedAvg and its buffers ------------------------------------------------------------------------


def test_fedavg_weights_each_worker_by_its_examples() -> None:
    averaged = ft.FedAvg().aggregate(START, ROUND_1, PARAMETERS)
    assert _close(averaged["w"], AVERAGE_1)
    assert not _close(averaged["w"], torch.tensor([0.0, 2.0, -1.0]))  # the unweighted mean
    assert _close(averaged["mean"], torch.tensor((3 * 1.0 + 5.0) / 4))  # float buffers too
    assert averaged["steps"].item() == 6  # integer buffers take the largest
    assert averaged["steps"].dtype == torch.int64
    assert averaged["w"].dtype == torch.float32
    # The order the updates arrive in does not change the result.
    assert torch.equal(ft.FedAvg().aggregate(START, ROUND_1[::-1], PARAMETERS)["w"], averaged["w"])


def test_fedavg_refuses_rounds_without_examples() -> None:
    with pytest.raises(ValueError, match="no updates"):
        ft.FedAvg().aggregate(START, [], PARAMETERS)
    empty = [ft.Update("a", ROUND_1[0].state, 0)]
    with pytest.raises(ValueError, match="no examples"):
        ft.FedAvg().aggregate(START, empty, PARAMETERS)


# -- server optimizers, two rounds by hand ---------------------------------------------------------


def test_fedavgm_applies_momentum_over_two_rounds() -> None:
    server_lr, beta = 0.5, 0.9
    strategy = ft.FedAvgM(server_lr=server_lr, beta=beta)
    first = strategy.aggregate(START, ROUND_1, PARAMETERS)
    second = strategy.aggregate(first, ROUND_2, PARAMETERS)
    # v1 = d1 = avg1 - w0;  w1 = w0 + lr v1
    v1 = AVERAGE_1 - START["w"]
    w1 = START["w"] + server_lr * v1  # [0.25, 1, -1]
    # v2 = beta v1 + (avg2 - w1);  w2 = w1 + lr v2
    v2 = beta * v1 + (AVERAGE_2 - w1)
    w2 = w1 + server_lr * v2
    assert _close(first["w"], w1)
    assert _close(second["w"], w2)
    assert _close(second["w"], torch.tensor([0.85, 2.4, -0.9]))  # the same, as numbers
    # Buffers are not moved by the optimizer: they take the round's average.
    assert _close(second["mean"], torch.tensor(3.0))
    assert second["steps"].item() == 9
    # Without its velocity, round two would be a plain step from w1: a different model.
    fresh = ft.FedAvgM(server_lr=server_lr, beta=beta).aggregate(first, ROUND_2, PARAMETERS)
    assert not _close(fresh["w"], w2)


def test_fedavgm_without_momentum_or_step_size_is_fedavg() -> None:
    plain = ft.FedAvgM(server_lr=1.0, beta=0.0)
    first = plain.aggregate(START, ROUND_1, PARAMETERS)
    assert _close(first["w"], AVERAGE_1)
    assert _close(plain.aggregate(first, ROUND_2, PARAMETERS)["w"], AVERAGE_2)


def test_fedadam_follows_adam_without_bias_correction_over_two_rounds() -> None:
    server_lr, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = ft.FedAdam(server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
    first = strategy.aggregate(START, ROUND_1, PARAMETERS)
    second = strategy.aggregate(first, ROUND_2, PARAMETERS)
    d1 = AVERAGE_1.double() - START["w"].double()
    m1 = (1 - beta1) * d1
    v1 = (1 - beta2) * d1 * d1
    w1 = START["w"].double() + server_lr * m1 / (v1.sqrt() + tau)
    d2 = AVERAGE_2.double() - w1
    m2 = beta1 * m1 + (1 - beta1) * d2
    v2 = beta2 * v1 + (1 - beta2) * d2 * d2
    w2 = w1 + server_lr * m2 / (v2.sqrt() + tau)
    assert _close(first["w"], w1)
    assert _close(second["w"], w2)
    # The first step is server_lr * sign(d1), shrunk by tau: 0.1 * 0.1|d1| / (0.1|d1| + tau)
    assert _close(
        first["w"], torch.tensor([0.1 * 0.05 / 0.051, 0.1 * 0.2 / 0.201, -0.1 * 0.2 / 0.201])
    )
    assert _close(second["mean"], torch.tensor(3.0))


@pytest.mark.parametrize(
    "make",
    [lambda: ft.FedAvgM(server_lr=0.5, beta=0.9), lambda: ft.FedAdam(server_lr=0.1)],
    ids=["FedAvgM", "FedAdam"],
)
def test_a_strategy_restored_from_its_state_continues_as_the_original(make: Any) -> None:
    original = make()
    first = original.aggregate(START, ROUND_1, PARAMETERS)
    restored = make()
    restored.load_state_dict(original.state_dict())
    assert _close(
        restored.aggregate(first, ROUND_2, PARAMETERS)["w"],
        original.aggregate(first, ROUND_2, PARAMETERS)["w"],
    )


def test_fedprox_refuses_a_negative_mu_and_averages_as_fedavg() -> None:
    with pytest.raises(ValueError, match="mu >= 0"):
        ft.FedProx(mu=-0.1)
    assert ft.FedProx(mu=0.5).prox_mu == 0.5
    assert ft.FedAvg().prox_mu == 0.0
    assert _close(ft.FedProx(mu=0.5).aggregate(START, ROUND_1, PARAMETERS)["w"], AVERAGE_1)
    assert repr(ft.FedAvgM(server_lr=0.5, beta=0.9)) == "FedAvgM(server_lr=0.5, beta=0.9)"


# -- strategies in ft.fit --------------------------------------------------------------------------


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))  # type: ignore[no-any-return]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Linear()


def _data(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 8, generator=generator), torch.randint(
        0, 3, (count,), generator=generator
    )


def _proximal_sgd(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], *, lr: float, mu: float, steps: int
) -> float:
    """FedProx's local training (Li et al., 2020), in plain torch: full-batch SGD on
    ``cross_entropy + mu/2 * ||w - w_global||^2``. Returns the mean loss over the steps."""
    anchors = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        proximal = sum(
            (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchors, strict=True)
        )
        loss = F.cross_entropy(model(data[0]), data[1]) + mu / 2 * proximal
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


async def test_fedprox_mu_reaches_the_workers_loss(ft_virtual_workers: WorkerFactory) -> None:
    bob = await ft_virtual_workers("bob")
    data = _data(32)
    federated = ft.federate(data, [bob], seed=0)
    mu, lr, epochs = 2.0, 0.5, 3
    model = _model()
    history = await ft.fit(
        model, federated, rounds=1, epochs=epochs, batch_size=32, lr=lr,
        strategy=ft.FedProx(mu=mu), progress=False,
    )  # fmt: skip
    del federated
    # One batch per epoch, so the order of examples in it does not matter.
    expected = _model()
    loss = _proximal_sgd(expected, data, lr=lr, mu=mu, steps=epochs)
    assert history[0].train_loss == pytest.approx(loss, abs=1e-5)
    for key, value in expected.state_dict().items():
        assert _close(model.state_dict()[key], value), key
    # The check can fail: without the proximal term the worker would have gone elsewhere.
    plain = _model()
    plain_loss = _proximal_sgd(plain, data, lr=lr, mu=0.0, steps=epochs)
    assert history[0].train_loss != pytest.approx(plain_loss, abs=1e-5)
    assert not _close(model.state_dict()["fc1.weight"], plain.state_dict()["fc1.weight"])


class KeepTheLargest(ft.Strategy):
    """Keeps the update of the worker that trained on the most examples; remembers its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[State, list[ft.Update], set[str]]] = []
        self.rounds = 0

    def aggregate(
        self, current: State, updates: Sequence[ft.Update], parameters: set[str]
    ) -> State:
        self.calls.append(
            ({k: v.clone() for k, v in current.items()}, list(updates), set(parameters))
        )
        self.rounds += 1
        largest = max(updates, key=lambda update: update.examples)
        return {key: value.clone() for key, value in largest.state.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = state["rounds"]


async def test_a_strategy_of_ones_own_aggregates_and_is_checkpointed(
    ft_virtual_workers: WorkerFactory, tmp_path: Path
) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    x, y = _data(40)
    federated = ft.FederatedDataset(
        [
            ft.Shard(bob, ft.send(x[:30], bob), ft.send(y[:30], bob), 30),
            ft.Shard(alice, ft.send(x[30:], alice), ft.send(y[30:], alice), 10),
        ]
    )
    model = _model()
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    strategy = KeepTheLargest()
    checkpoint = tmp_path / "run.pt"
    await ft.fit(
        model, federated, rounds=2, lr=0.1, strategy=strategy, checkpoint=checkpoint, progress=False
    )
    assert len(strategy.calls) == 2
    (current_1, updates_1, parameters), (current_2, updates_2, _) = strategy.calls
    assert parameters == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert sorted((u.worker, u.examples) for u in updates_1) == [("alice", 10), ("bob", 30)]
    for key in initial:
        assert torch.equal(current_1[key], initial[key])  # round 1 starts from the model
        bobs_1 = next(u for u in updates_1 if u.worker == "bob").state[key]
        assert torch.equal(current_2[key], bobs_1)  # round 2 from what round 1 returned
        bobs_2 = next(u for u in updates_2 if u.worker == "bob").state[key]
        assert torch.equal(model.state_dict()[key], bobs_2)  # the model is what it returned
    # Its state travels in the checkpoint: a resumed run counts on from there.
    resumed = KeepTheLargest()
    history = await ft.fit(
        _model(), federated, rounds=3, lr=0.1, strategy=resumed, checkpoint=checkpoint,
        resume=True, progress=False,
    )  # fmt: skip
    del federated
    assert [m.round for m in history] == [1, 2, 3]
    assert len(resumed.calls) == 1
    assert resumed.rounds == 3
