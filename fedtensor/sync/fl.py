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
cuts each worker's examples into batches with torch's own samplers, as PySyft's did
(``shuffle``, ``drop_last``; the order drawn here, from torch's global generator or
the ``generator`` given), and walks the workers in order, or with ``num_iterators``
several at once, or with ``iter_per_worker`` all at once (a dictionary of batches by
worker each step). A batch is an indexing operation on the worker's pointers (a
slice, or an index tensor), so it is pipelined and no example leaves its worker.
:meth:`FederatedDataset.federated` gives the same shards as fedtensor's own
:class:`fedtensor.FederatedDataset`, for :func:`fedtensor.sync.fit`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

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
    """``(data, target)`` pointer batches from the workers' data sets (PySyft's loader).

    Each worker's examples are cut into batches by torch's own samplers, as PySyft's
    loader did: a :class:`~torch.utils.data.BatchSampler` over a
    :class:`~torch.utils.data.SequentialSampler`, or for ``shuffle=True`` a
    :class:`~torch.utils.data.RandomSampler` (drawn from ``generator``, else torch's
    global generator, at the first batch of that worker in each pass), so the batches
    of one worker are those a plain ``torch.utils.data.DataLoader`` with the same
    sampler gives on that worker's shard. A batch is one indexing operation on the
    worker's pointers (a slice for consecutive examples, else an index tensor), so it
    is pipelined and no example leaves its worker.

    - The default (``num_iterators=1``): one worker's batches after another's, in the
      order of ``federated_dataset.workers``.
    - ``num_iterators=k`` (at most the number of workers less one; more are cut to
      that, as PySyft did): each step gives ``{worker: (data, target)}`` from ``k``
      distinct workers. Each of the ``k`` iterators starts on its own worker and,
      when that one runs out, goes on to the first worker it has not used that no
      other iterator is on; the pass ends when one iterator finds none.
    - ``iter_per_worker=True``: each step gives ``{worker: (data, target)}`` with one
      batch of every worker; the pass ends when the first worker runs out.
    - ``collate_fn``: given, it makes each batch from the list of ``(data, target)``
      pointer pairs of its examples (PySyft's way, an operation per example); by
      default the batch is the one indexing operation above.

    ``len()`` is PySyft's count: all examples over ``batch_size`` (rounded down with
    ``drop_last``), whatever the cut into workers. Bad option values raise
    :class:`ValueError`; options PySyft ignored too (``num_workers``, ``pin_memory``)
    are logged and ignored.
    """

    def __init__(
        self,
        federated_dataset: FederatedDataset,
        batch_size: int = 8,
        shuffle: bool = False,
        num_iterators: int = 1,
        drop_last: bool = False,
        collate_fn: Callable[[list[tuple[Any, Any]]], Any] | None = None,
        iter_per_worker: bool = False,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(federated_dataset, FederatedDataset):
            raise TypeError(
                "Your dataset is not a FederatedDataset, please use "
                "torch.utils.data.DataLoader instead."
            )
        _check_count("batch_size", batch_size)
        _check_count("num_iterators", num_iterators)
        for name, flag in (
            ("shuffle", shuffle),
            ("drop_last", drop_last),
            ("iter_per_worker", iter_per_worker),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} is True or False, not {flag!r}")
        if collate_fn is not None and not callable(collate_fn):
            raise ValueError(f"collate_fn is a function, not {collate_fn!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator is a torch.Generator, not {generator!r}")
        if kwargs:
            options = ", ".join(f"{key}: {value}" for key, value in kwargs.items())
            _log.warning("The following options are not supported: %s", options)
        self.federated_dataset = federated_dataset
        self.workers = federated_dataset.workers
        if not self.workers:
            raise ValueError("the federated data set has no workers")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.collate_fn = collate_fn
        self.iter_per_worker = iter_per_worker
        self.batch_samplers: dict[str, BatchSampler] = {}
        for worker in self.workers:
            examples = range(len(federated_dataset[worker]))
            sampler: Sampler[int] = (
                RandomSampler(examples, generator=generator)
                if shuffle
                else SequentialSampler(examples)
            )
            self.batch_samplers[worker] = BatchSampler(sampler, batch_size, drop_last)
        if iter_per_worker:
            self.num_iterators = len(self.workers)
        else:
            # An iterator that runs out moves to an idle worker, so one must stay idle.
            self.num_iterators = (
                1 if len(self.workers) == 1 else min(num_iterators, len(self.workers) - 1)
            )

    def _batch(self, worker: str, indices: list[int]) -> Any:
        dataset = self.federated_dataset[worker]
        if self.collate_fn is not None:
            return self.collate_fn([dataset[index] for index in indices])
        first = indices[0]
        if indices == list(range(first, first + len(indices))):
            where: Any = slice(first, first + len(indices))
        else:
            where = torch.tensor(indices)
        return dataset.data[where], dataset.targets[where]

    def __iter__(self) -> Iterator[Any]:
        if self.iter_per_worker:
            iterators: list[_Pass] = [
                _OneWorkerPass(self, index) for index in range(self.num_iterators)
            ]
        else:
            iterators = []
            for index in range(self.num_iterators):
                iterators.append(_SwitchingPass(self, index, iterators))
        handles = self.federated_dataset._workers
        while True:
            batches = {}
            for iterator in iterators:
                found = iterator.next_batch()
                if found is None:
                    return
                worker, batch = found
                if self.num_iterators == 1:
                    yield batch
                    break
                batches[handles[worker]] = batch
            else:
                yield batches

    def __len__(self) -> int:
        """PySyft's count: all examples over the batch size."""
        length = len(self.federated_dataset) / self.batch_size
        return int(length) if self.drop_last else math.ceil(length)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} is a positive integer, not {value!r}")


class _Pass:
    """One iterator of one pass over the data (PySyft's ``_DataLoader*Iter``)."""

    def next_batch(self) -> tuple[str, Any] | None:
        """The next batch and its worker, or ``None`` where this iterator is done."""
        raise NotImplementedError


class _OneWorkerPass(_Pass):
    """Batches of one worker only (``iter_per_worker``)."""

    def __init__(self, loader: FederatedDataLoader, index: int) -> None:
        self.loader = loader
        self.worker = loader.workers[index]
        self.batches = iter(loader.batch_samplers[self.worker])

    def next_batch(self) -> tuple[str, Any] | None:
        indices = next(self.batches, None)
        if indices is None:
            return None
        return self.worker, self.loader._batch(self.worker, indices)


class _SwitchingPass(_Pass):
    """Batches of a worker, then of the next one no other iterator is on (see the loader)."""

    def __init__(self, loader: FederatedDataLoader, index: int, siblings: list[_Pass]) -> None:
        self.loader = loader
        self.siblings = siblings
        self.index: int | None = index
        self.unused = dict(enumerate(loader.workers))
        # Each iterator walks every worker's batches with its own sampler iterator.
        self.batches = {worker: iter(sampler) for worker, sampler in loader.batch_samplers.items()}

    def next_batch(self) -> tuple[str, Any] | None:
        while self.index is not None:
            worker = self.unused[self.index]
            indices = next(self.batches[worker], None)
            if indices is not None:
                return worker, self.loader._batch(worker, indices)
            del self.unused[self.index]
            busy = {
                sibling.index for sibling in self.siblings if isinstance(sibling, _SwitchingPass)
            }
            self.index = next((index for index in self.unused if index not in busy), None)
        return None
