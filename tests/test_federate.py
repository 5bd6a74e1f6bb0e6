"""Splitting a data set over workers: IID, Dirichlet label skew, label shards."""

from __future__ import annotations

import pytest
import torch

import fedtensor as ft
from fedtensor.testing import WorkerFactory

pytestmark = pytest.mark.anyio

LABELS = torch.arange(10).repeat_interleave(100)  # 1,000 examples, 10 balanced classes


def _check_partition(parts: list[torch.Tensor], count: int) -> None:
    joined = torch.cat(parts)
    assert len(joined) == count
    assert torch.equal(joined.sort().values, torch.arange(count))  # disjoint and complete


def _classes(parts: list[torch.Tensor]) -> list[int]:
    return [len(torch.unique(LABELS[part])) for part in parts]


def test_iid_split_is_balanced_complete_and_reproducible() -> None:
    parts = ft.split_indices(LABELS, 7, split="iid", seed=3)
    _check_partition(parts, 1000)
    assert {len(part) for part in parts} <= {142, 143}
    again = ft.split_indices(LABELS, 7, split="iid", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = ft.split_indices(LABELS, 7, split="iid", seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))
    assert min(_classes(parts)) == 10  # every worker sees every class


def test_dirichlet_alpha_controls_label_skew() -> None:
    skewed = ft.split_indices(LABELS, 10, split="dirichlet", alpha=0.05, seed=0)
    even = ft.split_indices(LABELS, 10, split="dirichlet", alpha=1000.0, seed=0)
    _check_partition(skewed, 1000)
    _check_partition(even, 1000)
    assert sum(_classes(skewed)) / 10 < 5  # few classes per worker
    assert min(_classes(even)) == 10
    assert max(len(part) for part in even) < 130  # close to 100 each
    again = ft.split_indices(LABELS, 10, split="dirichlet", alpha=0.05, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(skewed, again, strict=True))
    assert min(len(part) for part in skewed) >= 1


def test_label_shards_give_each_worker_few_classes() -> None:
    parts = ft.split_indices(LABELS, 10, split="shards", shards_per_worker=2, seed=1)
    _check_partition(parts, 1000)
    assert max(_classes(parts)) <= 2
    assert {len(part) for part in parts} == {100}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        ft.split_indices(LABELS, 2, split="random")
    with pytest.raises(ValueError, match="cannot give"):
        ft.split_indices(LABELS[:3], 4)
    with pytest.raises(ValueError, match="alpha must be positive"):
        ft.split_indices(LABELS, 2, split="dirichlet", alpha=0)


async def test_federate_sends_each_shard_to_its_worker(ft_workers: WorkerFactory) -> None:
    bob, alice, carol = (
        await ft_workers("bob"),
        await ft_workers("alice"),
        await ft_workers("carol"),
    )
    data = torch.randn(1000, 3)
    federated = ft.federate((data, LABELS), [bob, alice, carol], split="dirichlet", seed=5)
    parts = ft.split_indices(LABELS, 3, split="dirichlet", seed=5)
    assert len(federated) == 1000
    assert federated.workers == [bob, alice, carol]
    assert federated.sizes() == {
        "bob": len(parts[0]),
        "alice": len(parts[1]),
        "carol": len(parts[2]),
    }
    for shard, part in zip(federated, parts, strict=True):
        assert shard.data.location is shard.worker
        assert torch.equal(await shard.data, data[part])
        assert torch.equal(await shard.targets, LABELS[part])
        # A training-style computation runs where the data is.
        mean = await shard.data.mean(dim=0).get()
        torch.testing.assert_close(mean, data[part].mean(dim=0))
    data.zero_()  # the workers hold copies
    assert not torch.equal(await federated.shards[0].data, torch.zeros(len(parts[0]), 3))
    del federated, shard


async def test_federate_a_torch_dataset(ft_virtual_workers: WorkerFactory) -> None:
    bob, alice = await ft_virtual_workers("bob"), await ft_virtual_workers("alice")
    dataset = torch.utils.data.TensorDataset(torch.arange(20.0).view(10, 2), torch.arange(10) % 2)
    federated = ft.federate(dataset, [bob, alice], split="shards", shards_per_worker=1)
    labels = [set((await shard.targets).tolist()) for shard in federated]
    assert labels == [{0}, {1}] or labels == [{1}, {0}]
    with pytest.raises(TypeError, match="federate"):
        ft.federate([1, 2, 3], [bob])
    del federated
