"""Differential privacy in federated training: clipping, noise, accounting, budgets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting  # type: ignore[import-untyped]
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedtensor as ft
from fedtensor.client.pointer import call_on
from fedtensor.demo import DigitsCNN
from fedtensor.federated.privacy import dp_sgd_schedule
from fedtensor.testing import WorkerFactory
from fedtensor.worker import dp as worker_dp
from fedtensor.worker.compiler import compile_plan
from fedtensor.worker.local_update import local_update

pytestmark = pytest.mark.anyio


class MLP(nn.Module):
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


def _model(kind: type[nn.Module] = MLP) -> nn.Module:
    torch.manual_seed(0)
    return kind()


def _flat(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.double().flatten() for value in state.values()])


def _delta(after: nn.Module, before: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return _flat(after.state_dict()) - _flat(before)


def _initial(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


async def _federated(
    factory: WorkerFactory, count: int, examples: int = 60
) -> tuple[list[Any], ft.FederatedDataset]:
    workers = [await factory(f"w{i}") for i in range(count)]
    return workers, ft.federate(_data(examples * count), workers, seed=0)


def _close_to(measured: float, expected: float, tolerance: float = 0.1) -> bool:
    return abs(measured - expected) <= tolerance * expected


# -- central DP ------------------------------------------------------------------------------------


class RecordingCentralDP(ft.CentralDP):
    """Central DP that records what the aggregator sums (its inputs) and the noise's std."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "summed", [])
        object.__setattr__(self, "stds", [])

    def noisy_sum(
        self, clipped: Sequence[Mapping[str, torch.Tensor]], std: float, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        self.summed.append([dict(update) for update in clipped])  # type: ignore[attr-defined]
        self.stds.append(std)  # type: ignore[attr-defined]
        return super().noisy_sum(clipped, std, generator)


async def test_central_dp_clips_every_update_the_aggregator_sums(
    ft_workers: WorkerFactory,
) -> None:
    # Over every transport: in-process objects, encoded frames, worker processes.
    _, federated = await _federated(ft_workers, 3)
    clip = 0.05
    dp = RecordingCentralDP(noise_multiplier=0.0, clip_norm=clip)
    model = _model()
    # Without DP the same training moves each worker's model far more than the bound.
    plain = await ft.fit(_model(), federated, rounds=1, lr=0.5, progress=False)
    assert plain[0].completed == ("w0", "w1", "w2")
    initial = _initial(model)
    history = await ft.fit(model, federated, rounds=2, lr=0.5, dp=dp, progress=False)
    del federated
    summed = dp.summed  # type: ignore[attr-defined]
    assert [len(round) for round in summed] == [3, 3]
    norms = [float(_flat(update).norm()) for round in summed for update in round]
    assert all(norm <= clip * (1 + 1e-9) for norm in norms), norms
    # Clipping was needed: every update hit the bound (training moves them by more).
    assert all(norm == pytest.approx(clip, rel=1e-4) for norm in norms)
    # No noise: the model moved by the mean of the clipped updates, each round.
    assert float(_delta(model, initial).norm()) <= 2 * clip * (1 + 1e-6)
    assert history[-1].clip_norm == clip


async def test_central_dp_noise_has_the_configured_standard_deviation(
    ft_virtual_workers: WorkerFactory,
) -> None:
    _, federated = await _federated(ft_virtual_workers, 2)
    model = _model()
    initial = _initial(model)
    # lr 0: the updates are zero, so the model moves by the noise alone.
    dp = ft.CentralDP(noise_multiplier=2.0, clip_norm=0.5)
    await ft.fit(model, federated, rounds=1, lr=0.0, dp=dp, progress=False)
    del federated
    moved = _delta(model, initial)
    assert moved.numel() > 1000
    # Noise of std 2.0 * 0.5 on the sum, divided by 2 workers.
    assert _close_to(float(moved.std()), 0.5), float(moved.std())
    assert abs(float(moved.mean())) < 0.1


async def test_adaptive_clipping_moves_the_bound_towards_the_quantile(
    ft_virtual_workers: WorkerFactory,
) -> None:
    _, federated = await _federated(ft_virtual_workers, 2)
    adaptive = ft.AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_noise_std=1e-6)
    dp = ft.CentralDP(noise_multiplier=0.0, clip_norm=100.0, adaptive=adaptive)
    history = await ft.fit(_model(), federated, rounds=3, lr=0.1, dp=dp, progress=False)
    del federated
    # Every update is within 100: the bound shrinks by exp(-0.2 * (1 - 0.5)) per round.
    expected = [100.0 * math.exp(-0.1 * k) for k in range(3)]
    assert [m.clip_norm for m in history] == pytest.approx(expected, rel=1e-4)


# -- local DP --------------------------------------------------------------------------------------


async def test_local_dp_clips_and_noises_each_workers_update(
    ft_workers: WorkerFactory,
) -> None:
    # Over every transport: in-process objects, encoded frames, worker processes.
    _, federated = await _federated(ft_workers, 1)
    model = _model()
    initial = _initial(model)
    await ft.fit(model, federated, rounds=1, lr=0.5, dp=ft.LocalDP(0.05, 0.0), progress=False)
    clipped = float(_delta(model, initial).norm())
    unclipped_model = _model()
    await ft.fit(unclipped_model, federated, rounds=1, lr=0.5, progress=False)
    assert clipped == pytest.approx(0.05, rel=1e-4)
    assert float(_delta(unclipped_model, initial).norm()) > 10 * 0.05
    noised = _model()
    await ft.fit(noised, federated, rounds=1, lr=0.0, dp=ft.LocalDP(0.5, 3.0), progress=False)
    del federated
    assert _close_to(float(_delta(noised, initial).std()), 1.5), float(
        _delta(noised, initial).std()
    )


# -- DP-SGD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [MLP, DigitsCNN])
def test_per_example_gradients_equal_one_backward_pass_per_example(kind: type[nn.Module]) -> None:
    model = _model(kind)
    x, y = _data(6)
    plan = compile_plan(ft.trace(model, F.cross_entropy, (x, y)).wire)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    gradients, losses, outputs = worker_dp.per_example_gradients(plan, state, x, y)
    assert outputs.shape == (6, 10)
    for i in range(6):
        model.zero_grad()
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()  # type: ignore[no-untyped-call]
        assert float(losses[i]) == pytest.approx(loss.item(), rel=1e-5)
        for key, parameter in model.named_parameters():
            assert parameter.grad is not None
            assert torch.allclose(gradients[key][i], parameter.grad, atol=1e-6), key
        # Clipping bounds each example's gradient (no noise, a batch of one).
        one = {key: value[i : i + 1] * 100 for key, value in gradients.items()}
        clipped = worker_dp.private_gradient(one, 0.1, 0.0, 1.0, torch.Generator())
        assert float(_flat(one).norm()) > 0.1
        assert float(_flat(clipped).norm()) == pytest.approx(0.1, rel=1e-4)


def test_dp_sgd_noise_has_the_configured_standard_deviation() -> None:
    model = _model()
    # No example sampled: the gradient is the noise alone, over the expected batch size.
    gradients = {key: torch.zeros((0, *value.shape)) for key, value in model.state_dict().items()}
    noised = worker_dp.private_gradient(gradients, 0.5, 4.0, 8.0, torch.Generator())
    assert _close_to(float(_flat(noised).std()), 0.5 * 4.0 / 8.0), float(_flat(noised).std())


def test_a_model_with_batch_norm_has_no_per_example_gradients() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10))
    x, y = _data(4)
    wire = ft.trace(model, F.cross_entropy, (x, y)).wire
    state = {key: value.detach() for key, value in model.state_dict().items()}
    with pytest.raises(ft.PlanError, match="batch norm"):
        local_update(wire, state, x, y, dp_sgd_clip_norm=1.0, dp_sgd_noise_multiplier=1.0)


async def test_dp_sgd_trains_on_workers_and_reports_example_level_epsilon(
    ft_workers: WorkerFactory,
) -> None:
    workers = [await ft_workers("dp0"), await ft_workers("dp1")]
    federated = ft.federate(_data(100), workers, seed=0)
    model = _model()
    initial = _initial(model)
    dp: list[ft.DPSGD | ft.LocalDP] = [ft.DPSGD(1.0, 1.1), ft.LocalDP(5.0, 0.1)]
    history = await ft.fit(
        model, federated, rounds=2, batch_size=10, epochs=1, lr=0.1, dp=dp, progress=False
    )
    del federated
    assert [m.completed for m in history] == [("dp0", "dp1")] * 2
    assert float(_delta(model, initial).norm()) > 0
    rate, steps = dp_sgd_schedule(50, 10, 1)
    assert (rate, steps) == (0.2, 5)
    accountant = dp_accounting.rdp.RdpAccountant()
    step = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(1.1))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, 2 * steps))
    assert history[-1].example_epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    local = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    local.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.05), 2))
    assert history[-1].epsilon == pytest.approx(local.get_epsilon(1e-5), rel=1e-9)


# -- accounting and budgets ------------------------------------------------------------------------


def _central_epsilon(noise_multiplier: float, rounds: int, delta: float = 1e-5) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    )
    return float(accountant.get_epsilon(delta))


async def test_reported_epsilon_is_the_accountants(ft_virtual_workers: WorkerFactory) -> None:
    _, federated = await _federated(ft_virtual_workers, 4, examples=20)
    dp = ft.CentralDP(noise_multiplier=1.3, clip_norm=1.0, delta=1e-6)
    history = await ft.fit(_model(), federated, rounds=3, lr=0.1, dp=dp, progress=False)
    assert [m.epsilon for m in history] == pytest.approx(
        [_central_epsilon(1.3, k, 1e-6) for k in (1, 2, 3)], rel=1e-9
    )
    # Sampling 2 of 4 workers per round: without replacement, under replace-one.
    sampled = await ft.fit(
        _model(), federated, rounds=3, lr=0.1, dp=dp, fraction=0.5, progress=False
    )
    del federated
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        4, 2, dp_accounting.GaussianDpEvent(1.3 / 2)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 3))
    assert sampled[-1].epsilon == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-9)
    assert all(len(m.sampled) == 2 for m in sampled)


async def test_target_epsilon_stops_the_run_before_the_budget_is_passed(
    ft_virtual_workers: WorkerFactory,
) -> None:
    _, federated = await _federated(ft_virtual_workers, 2, examples=20)
    dp = ft.CentralDP(noise_multiplier=1.0)
    budget = (_central_epsilon(1.0, 3) + _central_epsilon(1.0, 4)) / 2
    lines: list[str] = []

    class Lines:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    history = await ft.fit(
        _model(),
        federated,
        rounds=10,
        dp=dp,
        target_epsilon=budget,
        progress=Lines(),  # type: ignore[arg-type]
    )
    assert len(history) == 3
    assert history[-1].epsilon <= budget
    assert history.stopped is not None
    assert "round 4" in history.stopped
    assert any("epsilon" in line for line in lines)
    # Not even one round fits: refused before it starts.
    with pytest.raises(ValueError, match="not even one round"):
        await ft.fit(
            _model(), federated, rounds=3, dp=dp, target_epsilon=budget / 10, progress=False
        )
    del federated


async def test_noise_derived_from_a_target_epsilon_reaches_it(
    ft_virtual_workers: WorkerFactory,
) -> None:
    dp = ft.CentralDP.for_epsilon(2.0, rounds=4, workers=2)
    assert _central_epsilon(dp.noise_multiplier, 4) == pytest.approx(2.0, rel=1e-3)
    _, federated = await _federated(ft_virtual_workers, 2, examples=20)
    history = await ft.fit(
        _model(), federated, rounds=4, dp=dp, target_epsilon=2.01, progress=False
    )
    del federated
    assert len(history) == 4
    assert history[-1].epsilon == pytest.approx(2.0, rel=1e-3)
    sgd = ft.DPSGD.for_epsilon(3.0, rounds=5, examples=100, batch_size=10)
    accountant = dp_accounting.rdp.RdpAccountant()
    step = dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(sgd.noise_multiplier)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, 50))
    assert accountant.get_epsilon(1e-5) == pytest.approx(3.0, rel=1e-3)
    assert ft.LocalDP.for_epsilon(8.0, rounds=2).noise_multiplier > 0


# -- bad configurations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.CentralDP(noise_multiplier=-1.0),
        lambda: ft.CentralDP(noise_multiplier=1.0, clip_norm=0.0),
        lambda: ft.LocalDP(clip_norm=-1.0, noise_multiplier=1.0),
        lambda: ft.DPSGD(clip_norm=1.0, noise_multiplier=math.nan),
        lambda: ft.DPSGD(clip_norm=1.0, noise_multiplier=1.0, delta=0.0),
        lambda: ft.AdaptiveClipping(target_quantile=1.5),
    ],
)
def test_bad_mechanisms_are_refused(make: Any) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


async def test_fit_refuses_bad_privacy_configurations_before_any_round(
    ft_virtual_workers: WorkerFactory,
) -> None:
    workers, federated = await _federated(ft_virtual_workers, 2, examples=10)
    rounds: list[int] = []

    async def refused(model: nn.Module, match: str, **options: Any) -> None:
        with pytest.raises(ValueError, match=match):
            await ft.fit(
                model,
                federated,
                rounds=1,
                progress=False,
                on_round=lambda m: rounds.append(m.round),
                **options,
            )

    await refused(nn.Flatten(), "trainable parameters", dp=ft.CentralDP(1.0))
    await refused(_model(), "target_epsilon needs dp", target_epsilon=1.0)
    await refused(_model(), "at most one", dp=[ft.CentralDP(1.0), ft.LocalDP(1.0, 1.0)])
    await refused(_model(), "target_epsilon must be", dp=ft.CentralDP(1.0), target_epsilon=-1.0)
    await refused(_model(), "dp is", dp=[])
    await refused(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10)),
        "batch norm",
        dp=ft.DPSGD(1.0, 1.0),
    )
    await refused(
        _model(),
        "count's noise",
        dp=ft.CentralDP(1.0, adaptive=ft.AdaptiveClipping(count_noise_std=0.1)),
    )
    assert rounds == []
    # A worker refuses bad DP arguments from a client, and keeps serving.
    plan = ft.trace(_model(), F.cross_entropy, _data(2))
    shard = federated.shards[0]
    client = shard.worker.client
    stored_plan = client.store(plan.wire)
    state = client.store(_model().state_dict())
    for bad in (
        {"dp_sgd_clip_norm": -1.0},
        {"dp_local_clip_norm": 1.0, "dp_local_noise_multiplier": "x"},
    ):
        result = call_on(
            client, "fedtensor.local_update", (stored_plan, state, shard.data, shard.targets), bad
        )
        with pytest.raises(ft.RemoteError, match=r"clip_norm|noise_multiplier") as caught:
            await result.fetch(free=True)
        assert caught.value.remote_type == "PlanError"
    good = call_on(
        client, "fedtensor.local_update", (stored_plan, state, shard.data, shard.targets), {}
    )
    assert (await good.fetch(free=True))["examples"] == 10
    del stored_plan, state, shard, workers


# -- resuming a private run -----------------------------------------------------------------------

_ADAPTIVE = ft.AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_noise_std=1.0)

RESUMABLE: dict[str, Any] = {
    "central": ft.CentralDP(noise_multiplier=1.1, clip_norm=0.5),
    "central-sampled": ft.CentralDP(noise_multiplier=1.1, clip_norm=0.5),
    "central-adaptive": ft.CentralDP(noise_multiplier=1.1, clip_norm=0.5, adaptive=_ADAPTIVE),
    "local": ft.LocalDP(clip_norm=0.5, noise_multiplier=1.1),
    "dp-sgd+local": [ft.DPSGD(1.0, 1.1), ft.LocalDP(clip_norm=0.5, noise_multiplier=1.1)],
}


async def _stopped_and_resumed(
    federated: ft.FederatedDataset, checkpoint: Any, stop_after: int, rounds: int, **options: Any
) -> tuple[nn.Module, ft.History, ft.History, Any]:
    """A run stopped after ``stop_after`` rounds, then resumed in a new fit to ``rounds``;
    also the privacy state the stopped run's checkpoint held."""
    options = {"lr": 0.1, "batch_size": 10, "progress": False, "checkpoint": checkpoint, **options}
    first = await ft.fit(_model(), federated, rounds=stop_after, **options)
    saved = torch.load(checkpoint, weights_only=True)["extra"].get("privacy")
    resumed_model = _model()
    resumed = await ft.fit(resumed_model, federated, rounds=rounds, resume=True, **options)
    return resumed_model, first, resumed, saved


@pytest.mark.parametrize("name", list(RESUMABLE))
async def test_a_resumed_private_run_accounts_as_an_uninterrupted_one(
    ft_virtual_workers: WorkerFactory, tmp_path: Any, name: str
) -> None:
    _, federated = await _federated(ft_virtual_workers, 3, examples=20)
    fraction = 0.5 if name == "central-sampled" else 1.0  # 2 of 3: replace-one, sampled
    dp = RESUMABLE[name]
    straight = await ft.fit(
        _model(), federated, rounds=4, lr=0.1, batch_size=10, dp=dp, fraction=fraction,
        progress=False,
    )  # fmt: skip
    checkpoint = tmp_path / "run.pt"
    _, first, resumed, saved = await _stopped_and_resumed(
        federated, checkpoint, 2, 4, dp=dp, fraction=fraction
    )
    del federated
    assert [m.round for m in resumed] == [1, 2, 3, 4]
    # The same events in the same order: the same ε, round by round, to the last bit.
    for field in ("epsilon", "example_epsilon"):
        expected = [getattr(m, field) for m in straight]
        got = [getattr(m, field) for m in resumed]
        assert got == pytest.approx(expected, rel=0, abs=0, nan_ok=True), field
        assert not math.isnan(expected[-1]) or field == "example_epsilon"
    assert resumed[-1].epsilon > first[-1].epsilon  # rounds 3 and 4 added to rounds 1 and 2
    if name == "central-adaptive":
        # The bound continues from where the stopped run left it (not the initial 0.5).
        assert resumed[2].clip_norm == saved["clip_norm"] != 0.5


@pytest.mark.parametrize(
    "dp",
    [
        ft.CentralDP(noise_multiplier=0.0, clip_norm=0.05),
        ft.CentralDP(
            noise_multiplier=0.0,
            clip_norm=0.05,
            adaptive=ft.AdaptiveClipping(learning_rate=0.2, count_noise_std=1e-9),
        ),
        ft.LocalDP(clip_norm=0.05, noise_multiplier=0.0),
    ],
    ids=["central", "central-adaptive", "local"],
)
async def test_without_noise_a_resumed_private_run_ends_with_the_same_model(
    ft_virtual_workers: WorkerFactory, tmp_path: Any, dp: Any
) -> None:
    # The noise comes from the OS's randomness and is never replayed (README); without
    # noise, clipping and its bound alone decide the model: it must be the same.
    _, federated = await _federated(ft_virtual_workers, 2, examples=20)
    straight_model = _model()
    await ft.fit(straight_model, federated, rounds=4, lr=0.5, batch_size=10, dp=dp, progress=False)
    resumed_model, _, _, _ = await _stopped_and_resumed(
        federated, tmp_path / "run.pt", 2, 4, dp=dp, lr=0.5
    )
    del federated
    straight, ended = straight_model.state_dict(), resumed_model.state_dict()
    for key in straight:
        torch.testing.assert_close(ended[key], straight[key], rtol=1e-6, atol=1e-9)
    assert float(_flat(straight).sub(_flat(_model().state_dict())).norm()) > 0


async def test_target_epsilon_holds_across_a_resume(
    ft_virtual_workers: WorkerFactory, tmp_path: Any
) -> None:
    _, federated = await _federated(ft_virtual_workers, 2, examples=10)
    dp = ft.CentralDP(noise_multiplier=1.3)
    budget = (_central_epsilon(1.3, 3) + _central_epsilon(1.3, 4)) / 2  # room for 3 rounds
    _, first, resumed, _ = await _stopped_and_resumed(
        federated, tmp_path / "run.pt", 2, 10, dp=dp, target_epsilon=budget
    )
    del federated
    assert len(first) == 2
    assert [m.round for m in resumed] == [1, 2, 3]
    assert resumed.stopped is not None
    assert "before round 4" in resumed.stopped


@pytest.mark.parametrize(
    "dp",
    [
        ft.CentralDP(noise_multiplier=1.1, clip_norm=0.5),
        ft.LocalDP(clip_norm=0.5, noise_multiplier=1.1),
    ],
    ids=["central", "local"],
)
async def test_a_resumed_secure_private_run_accounts_as_an_uninterrupted_one(
    ft_virtual_workers: WorkerFactory, tmp_path: Any, dp: Any
) -> None:
    _, federated = await _federated(ft_virtual_workers, 3, examples=20)
    secure = ft.SecAggPlus(clip=1.0, bits=20)
    straight = await ft.fit(
        _model(), federated, rounds=4, lr=0.1, batch_size=10, dp=dp, secure_aggregation=secure,
        progress=False,
    )  # fmt: skip
    _, first, resumed, saved = await _stopped_and_resumed(
        federated, tmp_path / "run.pt", 2, 4, dp=dp, secure_aggregation=secure
    )
    del federated
    assert saved is not None
    assert [m.round for m in resumed] == [1, 2, 3, 4]
    assert not any(m.skipped for m in resumed)
    assert all(m.secure_aggregation for m in resumed[2:])  # the resumed rounds were secure
    expected = [m.epsilon for m in straight]
    assert [m.epsilon for m in resumed] == pytest.approx(expected, rel=0, abs=0)
    assert not math.isnan(expected[-1])
    assert resumed[-1].epsilon > first[-1].epsilon


async def test_target_epsilon_holds_across_a_resume_with_secure_aggregation(
    ft_virtual_workers: WorkerFactory, tmp_path: Any
) -> None:
    _, federated = await _federated(ft_virtual_workers, 2, examples=10)
    dp = ft.CentralDP(noise_multiplier=1.3, clip_norm=0.5)
    budget = (_central_epsilon(1.3, 3) + _central_epsilon(1.3, 4)) / 2  # room for 3 rounds
    _, first, resumed, _ = await _stopped_and_resumed(
        federated, tmp_path / "run.pt", 2, 10, dp=dp, target_epsilon=budget,
        secure_aggregation=ft.SecAggPlus(clip=1.0, bits=20),
    )  # fmt: skip
    del federated
    assert len(first) == 2
    assert [m.round for m in resumed] == [1, 2, 3]
    assert all(m.secure_aggregation and not m.skipped for m in resumed)
    assert resumed[-1].epsilon <= budget
    assert resumed.stopped is not None
    assert "before round 4" in resumed.stopped


async def test_a_checkpoint_resumes_only_with_the_dp_that_saved_it(
    ft_virtual_workers: WorkerFactory, tmp_path: Any
) -> None:
    _, federated = await _federated(ft_virtual_workers, 2, examples=10)
    plain, private = tmp_path / "plain.pt", tmp_path / "private.pt"
    options: dict[str, Any] = {"rounds": 2, "progress": False}
    await ft.fit(_model(), federated, checkpoint=plain, **options)
    await ft.fit(_model(), federated, checkpoint=private, dp=ft.CentralDP(1.0), **options)
    for checkpoint, dp, match in (
        (plain, ft.CentralDP(1.0), "non-private run"),
        (private, None, "saved by a private run"),
        (private, ft.LocalDP(1.0, 1.0), "same mechanisms"),
        (private, ft.CentralDP(2.0), "same mechanisms"),
        (private, [ft.CentralDP(1.0), ft.DPSGD(1.0, 1.0)], "same mechanisms"),
    ):
        with pytest.raises(ValueError, match=match):
            await ft.fit(
                _model(), federated, checkpoint=checkpoint, resume=True, dp=dp,
                **{**options, "rounds": 3},
            )  # fmt: skip
    # The same dp resumes.
    resumed = await ft.fit(
        _model(), federated, checkpoint=private, resume=True, dp=ft.CentralDP(1.0),
        **{**options, "rounds": 3},
    )  # fmt: skip
    del federated
    assert [m.round for m in resumed] == [1, 2, 3]


# -- central DP under secure aggregation -----------------------------------------------------------


async def test_with_secure_aggregation_the_workers_add_the_noise(
    ft_virtual_workers: WorkerFactory,
) -> None:
    _, federated = await _federated(ft_virtual_workers, 3)
    model = _model()
    initial = _initial(model)
    dp = RecordingCentralDP(noise_multiplier=3.0, clip_norm=0.5)
    history = await ft.fit(
        model,
        federated,
        rounds=1,
        lr=0.0,
        dp=dp,
        secure_aggregation=ft.SecAggPlus(),
        progress=False,
    )
    del federated
    assert history[0].completed == ("w0", "w1", "w2")
    # The aggregator added nothing: the unmasked sum already held the workers' noise,
    # N(0, (3 * 0.5)**2 / 3) each, and the mean of 3 has std 1.5 / 3.
    assert dp.summed == []  # type: ignore[attr-defined]
    moved = _delta(model, initial)
    assert _close_to(float(moved.std()), 0.5), float(moved.std())
    assert history[0].epsilon == pytest.approx(_central_epsilon(3.0, 1), rel=1e-9)


async def test_with_secure_aggregation_updates_are_clipped_and_weigh_the_same(
    ft_virtual_workers: WorkerFactory,
) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    x, y = _data(130)
    parts = [(x[:100], y[:100]), (x[100:], y[100:])]  # 100 and 30 examples
    federated = ft.FederatedDataset(
        [
            ft.Shard(worker, ft.send(part[0], worker), ft.send(part[1], worker), len(part[0]))
            for worker, part in zip([bob, alice], parts, strict=True)
        ]
    )
    clip = 0.05
    deltas = []
    for shard in federated.shards:  # each worker's own update, trained alone, clipped
        alone = _model()
        single = ft.FederatedDataset([shard])
        await ft.fit(alone, single, rounds=1, lr=0.5, seed=3, progress=False)
        delta = _delta(alone, _initial(_model()))
        deltas.append(delta * min(1.0, clip / float(delta.norm())))
    model = _model()
    initial = _initial(model)
    secure = ft.SecAggPlus(clip=1.0, bits=24)
    dp = ft.CentralDP(noise_multiplier=0.0, clip_norm=clip)
    await ft.fit(
        model, federated, rounds=1, lr=0.5, seed=3, dp=dp, secure_aggregation=secure, progress=False
    )
    del federated, single, shard
    moved = _delta(model, initial)
    step = 2 * 1.0 / (2**24 - 1)
    assert torch.allclose(moved, (deltas[0] + deltas[1]) / 2, atol=4 * step)
    # Weighted by examples it would be elsewhere: the check can fail.
    assert not torch.allclose(moved, (100 * deltas[0] + 30 * deltas[1]) / 130, atol=4 * step)


async def test_adaptive_clipping_is_refused_with_secure_aggregation(
    ft_virtual_workers: WorkerFactory,
) -> None:
    _, federated = await _federated(ft_virtual_workers, 2, examples=10)
    dp = ft.CentralDP(0.5, adaptive=ft.AdaptiveClipping(count_noise_std=1.0))
    with pytest.raises(ValueError, match="secure aggregation hides"):
        await ft.fit(
            _model(), federated, rounds=1, dp=dp, secure_aggregation=ft.SecAggPlus(), progress=False
        )
    del federated


# -- the demo --------------------------------------------------------------------------------------


def test_the_demo_trains_privately_within_its_epsilon() -> None:
    import io
    import re

    from fedtensor.demo import main

    # Central DP (user-level): DP-SGD's per-example path is tested above, and slower.
    out = io.StringIO()
    argv = ["--rounds", "2", "--epochs", "1", "--virtual", "2", "--no-central"]
    assert main([*argv, "--dp-epsilon", "40", "--dp-level", "user"], out=out) == 0
    text = out.getvalue()
    assert "user-level central DP" in text
    spent = [float(value) for value in re.findall(r"epsilon ([\d.]+), ", text)]
    assert len(spent) == 2
    assert 0 < spent[0] < spent[1] <= 40.0
    assert "held-out accuracy after 2 rounds" in text


def test_without_dp_accounting_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"pip install 'fedtensor\[dp\]'"):
        ft.CentralDP.for_epsilon(1.0, rounds=1, workers=2)
