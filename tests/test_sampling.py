"""How a round picks its workers: uniform sampling, and sampling stratified by executor
(``ft.fit(sampling="stratified")``, :mod:`fedtensor.federated.sampling`)."""

from __future__ import annotations

import collections
import math
import pathlib

import pytest
import torch

import fedtensor as ft
from fedtensor.federated.sampling import Strata, stratified_sample, uniform_sample

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shares(sampled: list[int], groups: list[list[int]]) -> list[int]:
    where = {index: number for number, group in enumerate(groups) for index in group}
    counts = collections.Counter(where[index] for index in sampled)
    return [counts[number] for number in range(len(groups))]


def test_each_executor_gets_its_share_every_round() -> None:
    halves = [list(range(500)), list(range(500, 1000))]
    unequal = [list(range(700)), list(range(700, 1000))]
    uniform_busiest = []
    for seed in range(200):
        sampled = stratified_sample(halves, 100, _generator(seed))
        assert len(set(sampled)) == 100
        assert sampled == sorted(sampled)
        assert _shares(sampled, halves) == [50, 50]
        assert _shares(stratified_sample(unequal, 100, _generator(seed)), unequal) == [70, 30]
        uniform_busiest.append(
            max(_shares(uniform_sample(range(1000), 100, _generator(seed)), halves))
        )
    # What it is for: uniform sampling's busier executor varies, and sets the round's time.
    assert max(uniform_busiest) >= 58
    assert sum(uniform_busiest) / len(uniform_busiest) > 52


def test_the_fractional_parts_go_out_in_proportion_and_the_total_is_exact() -> None:
    groups = [list(range(334)), list(range(334, 667)), list(range(667, 1000))]
    extra = collections.Counter()
    draws = 3000
    for seed in range(draws):
        shares = _shares(stratified_sample(groups, 100, _generator(seed)), groups)
        assert sum(shares) == 100
        assert all(share in (33, 34) for share in shares)  # 33.4, 33.3, 33.3
        extra[shares.index(34)] += 1
    for number, fraction in enumerate((0.4, 0.3, 0.3)):
        spread = 4 * math.sqrt(fraction * (1 - fraction) / draws)
        assert abs(extra[number] / draws - fraction) < spread


def test_every_shard_has_the_same_chance_as_under_uniform_sampling() -> None:
    groups = [list(range(30)), list(range(30, 50)), list(range(50, 60))]
    draws, count = 6000, 7  # shares 3.5, 2.33, 1.17
    seen = collections.Counter()
    for seed in range(draws):
        seen.update(stratified_sample(groups, count, _generator(seed)))
    chance = count / 60
    spread = 4 * math.sqrt(chance * (1 - chance) / draws)
    for index in range(60):
        assert abs(seen[index] / draws - chance) < spread, index


def test_edge_counts() -> None:
    groups = [[4, 9], [1], [7, 8, 3]]
    assert stratified_sample(groups, 6, _generator(0)) == [1, 3, 4, 7, 8, 9]
    assert stratified_sample(groups, 0, _generator(0)) == []
    with pytest.raises(ValueError, match="cannot sample 7 of 6"):
        stratified_sample(groups, 7, _generator(0))


def test_strata_follow_the_alive_shards() -> None:
    a, b = object(), object()
    strata = Strata([id(a), id(b), id(a), id(b), id(a)])
    assert strata.groups([0, 1, 2, 3, 4]) == [[0, 2, 4], [1, 3]]
    alive = [0, 1, 2, 3, 4]
    alive.remove(2)  # a worker dropped: the same list, changed
    assert strata.groups(alive) == [[0, 4], [1, 3]]
    assert strata.groups([1, 3]) == [[1, 3]]  # an executor with none left: no group
    assert strata.groups([0, 1, 2, 3, 4]) == [[0, 2, 4], [1, 3]]  # back again


def _data(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 4, generator=generator)
    return x, (x[:, 0] > 0).long()


async def test_fit_samples_by_executor_when_asked() -> None:
    async with ft.VirtualWorker("left") as left, ft.VirtualWorker("right") as right:
        clients = ft.simulate_clients(_data(400), clients=100, executors=[left, right])
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        options = {"rounds": 6, "fraction": 0.2, "batch_size": 4, "progress": False}
        history = await ft.fit(model, clients, sampling="stratified", **options)
        for metrics in history:
            numbers = [int(name.split("-")[1]) for name in metrics.completed]
            assert len(numbers) == 20
            assert sum(number < 50 for number in numbers) == 10  # clients 0-49 are left's
        uniform = await ft.fit(model, clients, **options)
        assert any(
            sum(int(name.split("-")[1]) < 50 for name in metrics.completed) != 10
            for metrics in uniform
        )
        with pytest.raises(ValueError, match="sampling must be one of uniform, stratified"):
            await ft.fit(model, clients, sampling="by size", **options)
        with pytest.raises(ValueError, match="dp needs sampling='uniform'"):
            await ft.fit(
                model,
                clients,
                sampling="stratified",
                dp=ft.CentralDP(noise_multiplier=1.0),
                **options,
            )
        clients.close()


async def test_a_checkpoint_resumes_only_with_the_sampling_that_saved_it(
    tmp_path: pathlib.Path,
) -> None:
    async with ft.VirtualWorker("left") as left, ft.VirtualWorker("right") as right:
        clients = ft.simulate_clients(_data(400), clients=100, executors=[left, right])
        options = {"fraction": 0.2, "batch_size": 4, "progress": False, "sampling": "stratified"}
        torch.manual_seed(0)
        whole = await ft.fit(torch.nn.Linear(4, 2), clients, rounds=2, **options)
        checkpoint = tmp_path / "run.pt"
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        await ft.fit(model, clients, rounds=1, checkpoint=checkpoint, **options)
        with pytest.raises(ValueError, match="saved by a run with sampling='stratified'"):
            await ft.fit(model, clients, rounds=2, checkpoint=checkpoint, resume=True,
                         **{**options, "sampling": "uniform"})  # fmt: skip
        resumed = await ft.fit(
            model, clients, rounds=2, checkpoint=checkpoint, resume=True, **options
        )
        assert resumed[1].completed == whole[1].completed  # the same clients as uninterrupted
        clients.close()
