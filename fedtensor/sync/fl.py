"""PySyft 0.2's data-set helpers (``syft.frameworks.torch.fl``) for :mod:`fedtensor.sync`.

Theory of operation
-------------------
PySyft's federated data flow (tutorials Parts 6 and 7) is three classes::

    dataset = sy.BaseDataset(data, targets).federate((bob, alice))  # a FederatedDataset
    loader = sy.FederatedDataLoader(dataset, batch_size=32, shuffle=True)
    for data, target in loader:          # pointers, one worker's batches after another's
        model.send(data.location)
        ...

:class:`BaseDataset` pairs examples and labels, local tensors or pointers to one
worker. ``federate(workers)`` splits a local one over the workers with
:func:`fedtensor.federate` (``split="contiguous"``: in order, one near-equal part per
worker, as PySyft cut it) and gives a :class:`FederatedDataset`, which is PySyft's
dictionary of per-worker data sets keyed by worker id. :class:`FederatedDataLoader`
walks the workers in order and each worker's examples in batches; a batch is an
indexing operation on the worker's pointers (a slice, or for ``shuffle=True`` an
index tensor drawn here from torch's global generator, as PySyft's sampler did), so
it is pipelined and no example leaves its worker. :meth:`FederatedDataset.federated`
gives the same shards as fedtensor's own :class:`fedtensor.FederatedDataset`, for
:func:`fedtensor.sync.fit`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from fedtensor.client.handles import WorkerHandle
from fedtensor.client.pointer import PointerBase
from fedtensor.federated import datasets as _datasets

__all__ = ["BaseDataset", "FederatedDataLoader", "FederatedDataset"]

_log = logging.getLogger(__name__)


def _length(value: Any) -> int:
    """The first dimension of a tensor, or of a pointer whose shape is known here."""
    shape = value.shape
    if shape is None or len(shape) == 0:
        raise TypeError(f"the length of {value!r} is not known here")
    return int(shape[0])


class BaseDataset:
    """Examples and labels that belong together (PySyft's ``sy.BaseDataset``).

    ``data`` and ``targets`` are tensors here, or pointers to tensors on one worker.
    """

    def __init__(self, data: Any, targets: Any, transform: Any = None) -> None:
        if transform is not None:
            raise TypeError("transform is not supported: transform the tensors first")
        self.data = data
        self.targets = targets
        if _length(data) != _length(targets):
            raise ValueError(f"{_length(data)} examples but {_length(targets)} labels")

    def __len__(self) -> int:
        return _length(self.data)

    def __getitem__(self, index: Any) -> tuple[Any, Any]:
        return self.data[index], self.targets[index]

    @property
    def location(self) -> Any:
        """The worker the data is on (for pointers)."""
        return getattr(self.data, "location", None)

    def federate(self, workers: Sequence[WorkerHandle]) -> FederatedDataset:
        """Split the examples in order over ``workers``, one part each (PySyft's
        ``dataset.federate((bob, alice))``)."""
        if isinstance(self.data, PointerBase) or isinstance(self.targets, PointerBase):
            raise TypeError("federate() splits local tensors; this data set is on a worker")
        federated = _datasets.federate((self.data, self.targets), list(workers), split="contiguous")
        return FederatedDataset(
            [_SizedDataset(shard.data, shard.targets, shard.size) for shard in federated]
        )

    def __repr__(self) -> str:
        return f"BaseDataset\n\tData: {self.data}\n\ttargets: {self.targets}"


class _SizedDataset(BaseDataset):
    """A shard whose length is known from the split (its pointers may not know shapes)."""

    def __init__(self, data: Any, targets: Any, size: int) -> None:
        self.data = data
        self.targets = targets
        self._size = size

    def __len__(self) -> int:
        return self._size


def dataset_federate(dataset: Any, workers: Sequence[WorkerHandle]) -> FederatedDataset:
    """``federate`` for a map-style torch ``Dataset`` of ``(example, label)`` items."""
    data, targets = _datasets._as_tensors(dataset)
    return BaseDataset(data, targets).federate(workers)


class FederatedDataset:
    """Data sets on workers, one per worker, keyed by worker id (PySyft's)."""

    def __init__(self, datasets: Iterable[BaseDataset]) -> None:
        self.datasets: dict[str, BaseDataset] = {}
        self._workers: dict[str, WorkerHandle] = {}
        for dataset in datasets:
            location = dataset.location
            if location is None:
                raise TypeError("a FederatedDataset holds data sets on workers (pointers)")
            self.datasets[location.id] = dataset
            self._workers[location.id] = location

    @property
    def workers(self) -> list[str]:
        """The worker ids, in order."""
        return list(self.datasets)

    def __getitem__(self, worker_id: str) -> BaseDataset:
        return self.datasets[worker_id]

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets.values())

    def federated(self) -> _datasets.FederatedDataset:
        """The same shards as a :class:`fedtensor.FederatedDataset` (for ``sy.fit``)."""
        return _datasets.FederatedDataset(
            [
                _datasets.Shard(self._workers[key], dataset.data, dataset.targets, len(dataset))
                for key, dataset in self.datasets.items()
            ]
        )

    def __repr__(self) -> str:
        return (
            f"FederatedDataset\n    Distributed accross: {', '.join(self.workers)}\n"
            f"    Number of datapoints: {len(self)}\n"
        )


class FederatedDataLoader:
    """``(data, target)`` pointer batches, worker after worker (PySyft's loader).

    Only PySyft's default iteration is offered (``num_iterators=1``, not
    ``iter_per_worker``); other options PySyft ignored too (``num_workers``,
    ``pin_memory``) are logged and ignored.
    """

    def __init__(
        self,
        federated_dataset: FederatedDataset,
        batch_size: int = 8,
        shuffle: bool = False,
        num_iterators: int = 1,
        drop_last: bool = False,
        iter_per_worker: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(federated_dataset, FederatedDataset):
            raise TypeError(
                "Your dataset is not a FederatedDataset, please use "
                "torch.utils.data.DataLoader instead."
            )
        if num_iterators != 1 or iter_per_worker:
            raise TypeError("only num_iterators=1 without iter_per_worker is supported")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if kwargs:
            options = ", ".join(f"{key}: {value}" for key, value in kwargs.items())
            _log.warning("The following options are not supported: %s", options)
        self.federated_dataset = federated_dataset
        self.workers = federated_dataset.workers
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last

    def _batches(self, dataset: BaseDataset) -> Iterator[tuple[Any, Any]]:
        size = len(dataset)
        order = torch.randperm(size) if self.shuffle else None
        for start in range(0, size, self.batch_size):
            stop = min(start + self.batch_size, size)
            if self.drop_last and stop - start < self.batch_size:
                return
            index: Any = slice(start, stop) if order is None else order[start:stop]
            yield dataset.data[index], dataset.targets[index]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for worker in self.workers:
            yield from self._batches(self.federated_dataset[worker])

    def __len__(self) -> int:
        """PySyft's count: all examples over the batch size."""
        length = len(self.federated_dataset) / self.batch_size
        return int(length) if self.drop_last else math.ceil(length)
