"""PySyft 0.2.9's ``sy.FederatedDataLoader`` options: shuffle, drop_last, num_iterators,
iter_per_worker, collate_fn, len() and bad values.

Three virtual workers hold shards of 7, 4 and 5 examples whose values are their global
numbers, so each batch says which examples it holds. Batches are checked against a plain
``torch.utils.data.DataLoader`` on the same shards where one applies, and against the
order PySyft's loader gave (worked out by hand here) where it does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import fedtensor.sync as sy

SIZES = {"dl_bob": 7, "dl_alice": 4, "dl_carol": 5}


def _shards() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    shards, start = {}, 0
    for name, size in SIZES.items():
        numbers = torch.arange(start, start + size)
        shards[name] = (numbers.float().unsqueeze(1), numbers * 10)
        start += size
    return shards


@pytest.fixture
def federated() -> Iterator[sy.FederatedDataset]:
    workers = [sy.VirtualWorker(id=name) for name in SIZES]
    try:
        datasets = [
            sy.BaseDataset(sy.send(data, worker), sy.send(targets, worker))
            for worker, (data, targets) in zip(workers, _shards().values(), strict=True)
        ]
        yield sy.FederatedDataset(datasets)
    finally:
        for worker in workers:
            worker.clear_objects()


def _numbers(batch: tuple[Any, Any]) -> tuple[str, list[int]]:
    """The worker and the example numbers of a ``(data, target)`` pointer batch."""
    data, target = batch
    assert data.location is target.location
    values = data.get().squeeze(1).long()
    assert torch.equal(target.get(), values * 10)  # examples and labels stay paired
    return data.location.id, values.tolist()


def _reference(**options: Any) -> list[tuple[str, list[int]]]:
    """A plain DataLoader over each shard in turn: the batches of the default iteration."""
    batches = []
    for name, (data, targets) in _shards().items():
        loader = DataLoader(TensorDataset(data, targets), **options)
        batches += [(name, batch.squeeze(1).long().tolist()) for batch, _ in loader]
    return batches


def _steps(loader: sy.FederatedDataLoader) -> list[dict[str, list[int]]]:
    """Each step's ``{worker: example numbers}`` for a loader that gives dictionaries."""
    steps = []
    for step in loader:
        assert isinstance(step, dict)
        numbers = {}
        for worker, batch in step.items():
            name, values = _numbers(batch)
            assert name == worker.id
            numbers[name] = values
        steps.append(numbers)
    return steps


@pytest.mark.parametrize("drop_last", [False, True])
def test_default_iteration_equals_a_dataloader_per_shard(
    federated: sy.FederatedDataset, drop_last: bool
) -> None:
    loader = sy.FederatedDataLoader(federated, batch_size=3, drop_last=drop_last)
    got = [_numbers(batch) for batch in loader]
    assert got == _reference(batch_size=3, drop_last=drop_last)
    assert [len(values) for _, values in got] == (
        [3, 3, 3, 3] if drop_last else [3, 3, 1, 3, 1, 3, 2]
    )
    assert [_numbers(batch) for batch in loader] == got  # a second pass, the same


@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffle_draws_each_shard_as_torch_samplers_do(
    federated: sy.FederatedDataset, drop_last: bool
) -> None:
    loader = sy.FederatedDataLoader(
        federated,
        batch_size=3,
        shuffle=True,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(7),
    )
    got = [_numbers(batch) for batch in loader]
    # The same draws in the same order: a DataLoader per shard over torch's samplers.
    generator = torch.Generator().manual_seed(7)
    expected = []
    for name, (data, targets) in _shards().items():
        sampler = BatchSampler(RandomSampler(data, generator=generator), 3, drop_last)
        shard = DataLoader(TensorDataset(data, targets), batch_sampler=sampler)
        expected += [(name, batch.squeeze(1).long().tolist()) for batch, _ in shard]
    assert got == expected
    # Shuffled within each shard: every example once (less the dropped), worker by worker.
    by_worker = {
        name: sorted(n for w, values in got for n in values if w == name) for name in SIZES
    }
    unshuffled = _reference(batch_size=3, drop_last=drop_last)
    assert [len(v) for _, v in got] == [len(v) for _, v in unshuffled]
    if not drop_last:
        assert by_worker == {
            name: sorted(n for w, values in unshuffled for n in values if w == name)
            for name in SIZES
        }
    assert got != unshuffled  # (for this seed) the order did change
    again = [_numbers(batch) for batch in loader]
    assert again != got  # each pass draws anew


def test_shuffle_uses_torchs_global_generator_by_default(federated: sy.FederatedDataset) -> None:
    loader = sy.FederatedDataLoader(federated, batch_size=4, shuffle=True)
    torch.manual_seed(3)
    got = [_numbers(batch) for batch in loader]
    torch.manual_seed(3)
    expected = []
    start = 0
    for name, size in SIZES.items():
        for indices in BatchSampler(RandomSampler(range(size)), 4, False):
            expected.append((name, [start + index for index in indices]))
        start += size
    assert got == expected


def test_num_iterators_gives_batches_of_distinct_workers(federated: sy.FederatedDataset) -> None:
    # Shards: bob 0-6, alice 7-10, carol 11-15; batches of 3. Iterator A starts on bob,
    # B on alice; one that runs out goes on to the first worker it has not used that the
    # other is not on; the pass ends when one finds none (A, after carol).
    expected = [
        {"dl_bob": [0, 1, 2], "dl_alice": [7, 8, 9]},
        {"dl_bob": [3, 4, 5], "dl_alice": [10]},
        {"dl_bob": [6], "dl_carol": [11, 12, 13]},
        {"dl_alice": [7, 8, 9], "dl_carol": [14, 15]},
        {"dl_alice": [10], "dl_bob": [0, 1, 2]},
        {"dl_carol": [11, 12, 13], "dl_bob": [3, 4, 5]},
        {"dl_carol": [14, 15], "dl_bob": [6]},
    ]
    loader = sy.FederatedDataLoader(federated, batch_size=3, num_iterators=2)
    assert loader.num_iterators == 2
    assert _steps(loader) == expected
    # More iterators than workers less one: cut to that, as PySyft did.
    more = sy.FederatedDataLoader(federated, batch_size=3, num_iterators=5)
    assert more.num_iterators == 2
    assert _steps(more) == expected


def test_iter_per_worker_gives_one_batch_of_every_worker(federated: sy.FederatedDataset) -> None:
    loader = sy.FederatedDataLoader(federated, batch_size=3, iter_per_worker=True)
    # Alice's 4 examples run out first: the pass ends at her third batch.
    assert _steps(loader) == [
        {"dl_bob": [0, 1, 2], "dl_alice": [7, 8, 9], "dl_carol": [11, 12, 13]},
        {"dl_bob": [3, 4, 5], "dl_alice": [10], "dl_carol": [14, 15]},
    ]
    dropped = sy.FederatedDataLoader(federated, batch_size=2, drop_last=True, iter_per_worker=True)
    assert _steps(dropped) == [
        {"dl_bob": [0, 1], "dl_alice": [7, 8], "dl_carol": [11, 12]},
        {"dl_bob": [2, 3], "dl_alice": [9, 10], "dl_carol": [13, 14]},
    ]


def test_one_worker_gives_plain_batches_whatever_the_iterators() -> None:
    worker = sy.VirtualWorker(id="dl_solo")
    try:
        data = torch.arange(5.0).unsqueeze(1)
        federated = sy.FederatedDataset(
            [sy.BaseDataset(sy.send(data, worker), sy.send(data.squeeze(1).long() * 10, worker))]
        )
        for options in ({"num_iterators": 3}, {"iter_per_worker": True}):
            loader = sy.FederatedDataLoader(federated, batch_size=2, **options)
            assert [_numbers(batch) for batch in loader] == [
                ("dl_solo", [0, 1]),
                ("dl_solo", [2, 3]),
                ("dl_solo", [4]),
            ]
    finally:
        worker.clear_objects()


def test_collate_fn_makes_each_batch_from_its_examples(federated: sy.FederatedDataset) -> None:
    seen = []

    def collate(examples: list[tuple[Any, Any]]) -> tuple[Any, Any]:
        seen.append(len(examples))
        return (
            torch.stack([data for data, _ in examples]),
            torch.stack([target for _, target in examples]),
        )

    loader = sy.FederatedDataLoader(federated, batch_size=3, collate_fn=collate)
    assert [_numbers(batch) for batch in loader] == _reference(batch_size=3)
    assert seen == [3, 3, 1, 3, 1, 3, 2]


def test_len_is_pysyfts_count(federated: sy.FederatedDataset) -> None:
    assert len(sy.FederatedDataLoader(federated, batch_size=3)) == 6  # ceil(16 / 3)
    assert len(sy.FederatedDataLoader(federated, batch_size=3, drop_last=True)) == 5
    assert len(sy.FederatedDataLoader(federated, batch_size=16)) == 1


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 0},
        {"batch_size": -2},
        {"batch_size": 2.5},
        {"batch_size": True},
        {"num_iterators": 0},
        {"num_iterators": "2"},
        {"shuffle": "yes"},
        {"drop_last": 1},
        {"iter_per_worker": None},
        {"collate_fn": 3},
        {"generator": 5},
    ],
)
def test_bad_values_are_refused(federated: sy.FederatedDataset, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        sy.FederatedDataLoader(federated, **options)


def test_a_plain_dataset_is_refused() -> None:
    with pytest.raises(TypeError, match="not a FederatedDataset"):
        sy.FederatedDataLoader(TensorDataset(torch.ones(2)))  # type: ignore[arg-type]
