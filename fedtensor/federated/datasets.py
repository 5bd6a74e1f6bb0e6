"""Data that stays put: splitting a data set over workers.

:func:`federate` sends one shard of a data set to each worker and returns a
:class:`FederatedDataset` of pointers; from then on the data lives on the
workers and only pointers to it are held here. :func:`split_indices` is the
pure part, which decides who gets which examples:

``"iid"``
    A seeded random permutation cut into near-equal parts.
``"dirichlet"``
    Label skew as in NIID-Bench: for each class, the shares of the workers are
    drawn from a Dirichlet distribution with concentration ``alpha`` (small
    ``alpha``: each worker sees few classes; large: close to IID). Draws are
    repeated until every worker has at least ``min_size`` examples.
``"shards"``
    The pathological split of McMahan et al. (2017): examples sorted by label,
    cut into ``shards_per_worker`` x workers shards, each worker given
    ``shards_per_worker`` of them at random.
``"contiguous"``
    The examples in their order, cut into near-equal parts (what PySyft's
    ``dataset.federate`` did).

Every split is reproducible from its ``seed`` and uses its own random number
generators, never torch's or Python's global ones.

``holdout`` (a fraction) keeps part of each worker's examples out of training, on
that worker, for federated evaluation (:mod:`fedtensor.federated.evaluation`):
:func:`holdout_split` picks them from a generator seeded with the split's seed and
the worker's position, so the same call holds out the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from fedtensor.client.handles import WorkerHandle, send
from fedtensor.client.pointer import call_on
from fedtensor.errors import RemoteError, WorkerUnavailable
from fedtensor.errors import TimeoutError as FedTimeoutError

__all__ = [
    "FederatedDataset",
    "Shard",
    "comes_back_empty",
    "federate",
    "holdout_split",
    "load_dataset",
    "split_indices",
]

SPLITS = ("iid", "dirichlet", "shards", "contiguous")


def comes_back_empty(worker: object) -> bool:
    """Whether ``worker`` may come back, empty, after it went away: it has a
    ``rejoin()`` (a Ray actor that Ray restarts). What is sent to such a worker is kept
    here, to be sent again when it rejoins a run."""
    return getattr(worker, "rejoin", None) is not None


@dataclass(frozen=True)
class Shard:
    """One worker's part of a federated data set."""

    worker: WorkerHandle
    #: Pointer to this worker's examples (first dimension: examples).
    data: Any
    #: Pointer to their labels.
    targets: Any
    #: How many examples the worker holds.
    size: int
    #: Pointers to the worker's held-out examples and labels (``holdout``), kept out
    #: of training for federated evaluation; None without a held-out part.
    eval_data: Any = None
    eval_targets: Any = None
    #: How many examples are held out.
    eval_size: int = 0
    #: Makes this shard again on its worker: ``ft.fit`` calls it when a restarted worker
    #: rejoins a run (its old pointers died with it). A shard of :func:`load_dataset`
    #: is loaded again by name; one that :func:`federate` sent to a worker that can
    #: come back is sent again from the copy kept for that. None: it cannot be remade.
    reload: Callable[[], Awaitable[Shard]] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """Whose shard this is, as ``History`` names it: the worker's id (a simulated
        client's own name, :mod:`fedtensor.federated.simulation`)."""
        return self.worker.id


class FederatedDataset:
    """Pointers to the shards of a data set that lives on workers."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards: tuple[Shard, ...] = tuple(shards)

    @property
    def workers(self) -> list[WorkerHandle]:
        return [shard.worker for shard in self.shards]

    def __len__(self) -> int:
        """The number of examples over all workers."""
        return sum(shard.size for shard in self.shards)

    def __iter__(self) -> Iterator[Shard]:
        return iter(self.shards)

    def sizes(self) -> dict[str, int]:
        """Examples per worker id."""
        return {shard.worker.id: shard.size for shard in self.shards}

    async def take_back(self, dropped: Sequence[int]) -> tuple[list[int], set[int]]:
        """Remake on their worker the ``dropped`` shards whose worker is reachable again.

        A worker handle that can come back has a ``rejoin()`` (``ft.ray.RayWorker``: Ray
        restarted its actor, empty), which answers without waiting for the restart; it is
        asked once per call, however many of its shards were dropped (simulated clients
        share their executor). A shard is remade by its ``reload`` (a data set the
        worker loads by name again, or what this client sent, sent again from the copy
        it kept; a simulated client's block once for all its clients), in ``shards``
        itself, so the data set works after the run too. Returns the indices back, and
        the indices that are back or can never come back (no ``rejoin`` or no
        ``reload``): what the caller stops asking about. A shard whose worker is still
        restarting, or whose reload failed, is in neither: asked about again next time.
        ``fedtensor.fit`` calls it before each round, the asynchronous strategies after
        each update taken.
        """
        answers: dict[int, bool] = {}  # id of a worker handle -> whether it is back
        back: list[int] = []
        settled: set[int] = set()
        shards = list(self.shards)
        for index in dropped:
            shard = shards[index]
            rejoin = getattr(shard.worker, "rejoin", None)
            if rejoin is None or shard.reload is None:
                settled.add(index)  # it cannot come back
                continue
            if id(shard.worker) not in answers:
                answers[id(shard.worker)] = await rejoin()
            if not answers[id(shard.worker)]:
                continue  # still restarting (or gone for good)
            try:
                shards[index] = await shard.reload()
            except (WorkerUnavailable, FedTimeoutError, RemoteError):
                continue
            back.append(index)
            settled.add(index)
        if back:
            self.shards = tuple(shards)
        return back, settled

    def __repr__(self) -> str:
        parts = ", ".join(f"{worker}: {size}" for worker, size in self.sizes().items())
        return f"<FederatedDataset {len(self)} examples; {parts}>"


def split_indices(
    targets: torch.Tensor,
    workers: int,
    *,
    split: str = "iid",
    alpha: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
    min_size: int = 1,
) -> list[torch.Tensor]:
    """For each of ``workers`` workers, the (sorted) indices of the examples it gets."""
    count = len(targets)
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if count < workers * min_size:
        raise ValueError(f"{count} examples cannot give {workers} workers {min_size} each")
    generator = torch.Generator().manual_seed(seed)
    if split == "iid":
        order = torch.randperm(count, generator=generator)
        parts = list(torch.tensor_split(order, workers))
    elif split == "contiguous":
        # In order, near-equal parts: PySyft's dataset.federate (fedtensor.sync.fl).
        parts = list(torch.tensor_split(torch.arange(count), workers))
    elif split == "dirichlet":
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        parts = _dirichlet(targets, workers, alpha, random.Random(seed), generator, min_size)
    elif split == "shards":
        if shards_per_worker < 1:
            raise ValueError("shards_per_worker must be at least 1")
        parts = _shards(targets, workers, shards_per_worker, generator)
    else:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return [part.sort().values for part in parts]


def _dirichlet(
    targets: torch.Tensor,
    workers: int,
    alpha: float,
    rng: random.Random,
    generator: torch.Generator,
    min_size: int,
    attempts: int = 1000,
) -> list[torch.Tensor]:
    classes = torch.unique(targets)
    by_class = [torch.nonzero(targets == label).flatten() for label in classes]
    for _ in range(attempts):
        parts: list[list[torch.Tensor]] = [[] for _ in range(workers)]
        for members in by_class:
            members = members[torch.randperm(len(members), generator=generator)]
            weights = [rng.gammavariate(alpha, 1.0) for _ in range(workers)]
            total = sum(weights) or 1.0
            cuts, running = [], 0.0
            for weight in weights[:-1]:
                running += weight / total
                cuts.append(round(running * len(members)))
            for worker, piece in enumerate(torch.tensor_split(members, cuts)):
                parts[worker].append(piece)
        joined = [torch.cat(pieces) for pieces in parts]
        if min(len(part) for part in joined) >= min_size:
            return joined
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave every worker {min_size} examples in "
        f"{attempts} draws: raise alpha or lower min_size"
    )


def _shards(
    targets: torch.Tensor, workers: int, shards_per_worker: int, generator: torch.Generator
) -> list[torch.Tensor]:
    order = torch.sort(targets, stable=True).indices
    shards = list(torch.tensor_split(order, workers * shards_per_worker))
    assignment = torch.randperm(len(shards), generator=generator).tolist()
    return [
        torch.cat(
            [shards[assignment[worker * shards_per_worker + k]] for k in range(shards_per_worker)]
        )
        for worker in range(workers)
    ]


def holdout_split(
    count: int, fraction: float, *, seed: int = 0, index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (sorted) among ``count`` examples kept for training, and those held out.

    ``round(fraction * count)`` are held out, at least one (when ``fraction`` > 0)
    and never all; which ones comes from a generator seeded with ``seed`` and the
    worker's ``index``, so the split is reproducible.
    """
    if not 0 <= fraction < 1:
        raise ValueError("holdout must be in [0, 1)")
    held = 0 if fraction == 0 else min(count - 1, max(1, round(fraction * count)))
    if held <= 0:
        return torch.arange(count), torch.arange(0)
    generator = torch.Generator().manual_seed((seed * 1_000_033 + index * 7_877 + 1) % (2**63))
    order = torch.randperm(count, generator=generator)
    return order[held:].sort().values, order[:held].sort().values


def _as_tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, tuple) and len(dataset) == 2:
        data, targets = dataset
    elif isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
        data, targets = dataset.tensors
    elif isinstance(dataset, torch.utils.data.Dataset):
        items = [dataset[index] for index in range(len(dataset))]  # type: ignore[arg-type]
        data = torch.stack([torch.as_tensor(item[0]) for item in items])
        targets = torch.as_tensor([int(item[1]) for item in items])
    else:
        raise TypeError("federate() takes (data, targets) tensors or a map-style torch Dataset")
    if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("federate() needs tensors of examples and of labels")
    if len(data) != len(targets):
        raise ValueError(f"{len(data)} examples but {len(targets)} labels")
    return data, targets


def federate(
    dataset: Any,
    workers: Sequence[WorkerHandle],
    *,
    split: str = "iid",
    alpha: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
    min_size: int = 1,
    holdout: float = 0.0,
) -> FederatedDataset:
    """Send one shard of ``dataset`` to each worker; see :func:`split_indices` for ``split``.

    ``dataset`` is a ``(data, targets)`` pair of tensors or a map-style torch
    ``Dataset`` of ``(example, label)`` items. The sends run concurrently and
    the local tensors may change right away: each worker holds its own copy.
    ``holdout`` > 0 keeps that fraction of each worker's shard out of training,
    on the worker, for federated evaluation (:func:`holdout_split`).
    """
    if not 0 <= holdout < 1:
        raise ValueError("holdout must be in [0, 1)")
    data, targets = _as_tensors(dataset)
    parts = split_indices(
        targets,
        len(workers),
        split=split,
        alpha=alpha,
        shards_per_worker=shards_per_worker,
        seed=seed,
        min_size=min_size,
    )
    return FederatedDataset(
        [
            _sent_shard(worker, data[part], targets[part], holdout, seed, index)
            for index, (worker, part) in enumerate(zip(workers, parts, strict=True))
        ]
    )


def _sent_shard(
    worker: WorkerHandle,
    data: torch.Tensor,
    targets: torch.Tensor,
    holdout: float,
    seed: int,
    index: int,
) -> Shard:
    """Worker ``index``'s shard of :func:`federate`, sent from this client.

    A worker that can come back empty (it has a ``rejoin()``: a Ray actor that Ray
    restarts) keeps its shard's local copy here, to be sent again when it rejoins a
    run (``Shard.reload``); for any other worker nothing is kept.
    """
    reload = None
    if comes_back_empty(worker):
        reload = partial(_resend_shard, worker, data, targets, holdout, seed, index)
    return _split_shard(
        worker, data, targets, len(data), holdout, seed, index, reload, partial(_send_to, worker)
    )


def _send_to(worker: WorkerHandle, tensor: torch.Tensor) -> Any:
    return send(tensor, worker)


def _split_shard(
    worker: WorkerHandle, data: Any, targets: Any, count: int, holdout: float, seed: int,
    index: int, reload: Callable[[], Awaitable[Shard]] | None, place: Callable[[Any], Any],
) -> Shard:  # fmt: skip
    """Worker ``index``'s shard of ``count`` examples, ``holdout`` of them held out
    (:func:`holdout_split`), each part put on the worker by ``place``: sent from here
    (:func:`federate`), or already there (:func:`load_dataset`: pointers, as they are)."""
    if not holdout:
        return Shard(worker, place(data), place(targets), count, reload=reload)
    train, held = holdout_split(count, holdout, seed=seed, index=index)
    return Shard(
        worker,
        place(data[train]),
        place(targets[train]),
        len(train),
        place(data[held]),
        place(targets[held]),
        len(held),
        reload=reload,
    )


async def _resend_shard(
    worker: WorkerHandle,
    data: torch.Tensor,
    targets: torch.Tensor,
    holdout: float,
    seed: int,
    index: int,
) -> Shard:
    """The shard of :func:`_sent_shard` sent again (the same split), to a restarted worker."""
    return _sent_shard(worker, data, targets, holdout, seed, index)


async def load_dataset(
    workers: Sequence[WorkerHandle],
    name: str,
    *,
    timeout: float | None = None,
    holdout: float = 0.0,
    seed: int = 0,
) -> FederatedDataset:
    """Pointers to the data set ``name`` that each worker holds itself.

    This is the real federated case: the examples were never here. A worker
    process offers data sets given at start-up (``fedtensor worker --dataset
    NAME=FILE``), a :class:`~fedtensor.VirtualWorker` those of its
    ``datasets`` argument. Each client gets its own copy of the examples on the
    worker. Raises :class:`~fedtensor.RemoteError` if a worker lacks ``name``.
    ``holdout`` > 0 keeps that fraction of each worker's examples out of training
    for federated evaluation, chosen by :func:`holdout_split` from ``seed``: the
    split happens on the worker (only index lists travel).
    """
    if not 0 <= holdout < 1:
        raise ValueError("holdout must be in [0, 1)")
    sizes = [call_on(worker.client, "fedtensor.dataset", (name, "size"), {}) for worker in workers]
    shards = [
        Shard(
            worker,
            call_on(worker.client, "fedtensor.dataset", (name, "data"), {}),
            call_on(worker.client, "fedtensor.dataset", (name, "targets"), {}),
            0,
        )
        for worker in workers
    ]
    counts = [await size.fetch(free=True, timeout=timeout) for size in sizes]
    return FederatedDataset(
        [
            _dataset_shard(shard, int(count), name, holdout, seed, index, timeout)
            for index, (shard, count) in enumerate(zip(shards, counts, strict=True))
        ]
    )


def _dataset_shard(
    shard: Shard, count: int, name: str, holdout: float, seed: int, index: int,
    timeout: float | None,
) -> Shard:  # fmt: skip
    """The shard of worker ``index`` of :func:`load_dataset`: split, and able to reload."""
    reload = partial(_reload_dataset_shard, shard.worker, name, holdout, seed, index, timeout)
    return _split_shard(
        shard.worker, shard.data, shard.targets, count, holdout, seed, index, reload, _in_place
    )


def _in_place(pointer: Any) -> Any:
    return pointer


async def _reload_dataset_shard(
    worker: WorkerHandle, name: str, holdout: float, seed: int, index: int,
    timeout: float | None,
) -> Shard:  # fmt: skip
    """Worker ``index``'s shard of data set ``name`` made again (the same split)."""
    client = worker.client
    count = await call_on(client, "fedtensor.dataset", (name, "size"), {}).fetch(
        free=True, timeout=timeout
    )
    loaded = Shard(
        worker,
        call_on(client, "fedtensor.dataset", (name, "data"), {}),
        call_on(client, "fedtensor.dataset", (name, "targets"), {}),
        0,
    )
    return _dataset_shard(loaded, int(count), name, holdout, seed, index, timeout)
