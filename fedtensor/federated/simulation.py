"""Many simulated clients on a few executors: :func:`simulate_clients`.

::

    async with ft.local_workers(2) as executors:
        clients = ft.simulate_clients((x, y), clients=10_000, executors=executors)
        history = await ft.fit(model, clients, rounds=10, fraction=0.01)

Theory of operation
-------------------
In simulation a client is a part of a data set and a seed, not a worker: 10,000
clients must not mean 10,000 actors, connections or copies of the data. So the
data set is cut into clients (IID, Dirichlet or shards, by
:func:`~fedtensor.federated.datasets.split_indices`, or by a given per-example
client id: a natural partition, as LEAF's FEMNIST splits by writer), the clients
are pinned to executors in contiguous runs (any worker handles: virtual workers,
``ft.local_workers`` processes, Ray workers), and each executor is sent, once,
one *block*: the examples of its clients, client after client. A client is then
an executor, a block and a row range ``start:stop`` (a :class:`ClientShard`).

Its ``data`` and ``targets`` are made when read: ``block[start:stop]``, one slice
command queued on the executor (no round trip), whose result is a view of the
block, not a copy. :func:`~fedtensor.federated.fit.fit` reads them only for the
clients a round samples and drops them after the round, so an executor holds
the block plus the views of the clients of the round in progress: its memory
grows with the clients per round, not with the clients that exist. Here each
client costs one small Python object; opening and closing N clients is linear
in N and sends nothing per client.

A :class:`SimulatedClients` is a :class:`~fedtensor.FederatedDataset`: ``fit``
samples its clients (``fraction``) with the usual seeded sampling, stores the
plan once per executor, and queues every sampled client's local update at once;
an executor runs the commands it receives in order, so it trains its clients of
the round one after another while the other executors train theirs. The client's
position in the data set gives it its seed (``worker_seed``), exactly as a worker's
does: with ``split="iid"`` and the same ``seed``, N simulated clients train exactly
as ``ft.federate`` over N virtual workers would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtensor.client.handles import WorkerHandle, send
from fedtensor.federated.datasets import (
    SPLITS,
    FederatedDataset,
    Shard,
    _as_tensors,
    split_indices,
)

__all__ = ["ClientShard", "SimulatedClients", "simulate_clients"]


class _Block:
    """The examples of one executor's clients, client after client, stored there once."""

    __slots__ = ("data", "executor", "targets")

    def __init__(self, executor: WorkerHandle, data: Any, targets: Any) -> None:
        self.executor = executor
        self.data = data
        self.targets = targets


class ClientShard(Shard):
    """One simulated client: rows ``start:stop`` of its executor's block.

    ``data`` and ``targets`` are new pointers to views of those rows each time
    they are read (one slice command each); nothing per client is kept on the
    executor between rounds.
    """

    def __init__(self, block: _Block, start: int, stop: int, client: str) -> None:
        # Shard is a frozen dataclass: its fields are set as its own __init__ sets them.
        object.__setattr__(self, "worker", block.executor)
        object.__setattr__(self, "size", stop - start)
        object.__setattr__(self, "eval_data", None)
        object.__setattr__(self, "eval_targets", None)
        object.__setattr__(self, "eval_size", 0)
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "client", client)

    _block: _Block
    #: The client's first row in its executor's block.
    start: int
    #: The client's name (in ``History``: sampled, completed, failed).
    client: str

    @property
    def data(self) -> Any:
        return self._block.data[self.start : self.start + self.size]

    @property
    def targets(self) -> Any:
        return self._block.targets[self.start : self.start + self.size]

    @property
    def name(self) -> str:
        return self.client

    # Identity, not field by field: comparing fields would read (make) the pointers.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return (
            f"<ClientShard {self.client}: {self.size} examples, rows {self.start}:"
            f"{self.start + self.size} on {self.worker.id}>"
        )


class SimulatedClients(FederatedDataset):
    """Many clients over a few executors (:func:`simulate_clients`); ``close()`` lets go."""

    def __init__(self, shards: Sequence[ClientShard], blocks: Sequence[_Block]) -> None:
        super().__init__(shards)
        self._blocks = list(blocks)

    @property
    def executors(self) -> list[WorkerHandle]:
        """The worker handles the clients train on (each holds one block)."""
        return [block.executor for block in self._blocks]

    def sizes(self) -> dict[str, int]:
        """Examples per client name."""
        return {shard.name: shard.size for shard in self.shards}

    def close(self) -> None:
        """Drop every client and the blocks' pointers (the blocks are freed on the executors)."""
        self.shards = ()
        self._blocks.clear()

    def __repr__(self) -> str:
        return (
            f"<SimulatedClients {len(self.shards)} clients, {len(self)} examples on "
            f"{len(self._blocks)} executors>"
        )


def simulate_clients(
    dataset: Any,
    *,
    clients: int | None = None,
    executors: Sequence[WorkerHandle],
    split: str = "iid",
    client_ids: torch.Tensor | None = None,
    alpha: float = 0.5,
    shards_per_worker: int = 2,
    seed: int = 0,
    min_size: int = 1,
) -> SimulatedClients:
    """Cut ``dataset`` into ``clients`` simulated clients trained on ``executors``.

    ``dataset`` is a ``(data, targets)`` pair or a map-style torch ``Dataset``
    (as for :func:`~fedtensor.federate`). ``split`` is ``"iid"``, ``"dirichlet"``
    or ``"shards"`` (:func:`~fedtensor.federated.datasets.split_indices`, with
    ``alpha``, ``shards_per_worker``, ``seed``, ``min_size``); or ``client_ids``,
    one integer per example, makes one client per distinct id (named
    ``client-ID``, in increasing order of id), and then ``clients`` may be left
    out. Clients are pinned to the executors in contiguous runs of near-equal
    count; each executor is sent its clients' examples once (the sends run
    concurrently, the local tensors may change right away).
    """
    data, targets = _as_tensors(dataset)
    if not executors:
        raise ValueError("simulate_clients needs at least one executor")
    if client_ids is not None:
        order, counts, names = _by_client_id(client_ids, len(targets))
        if clients is not None and clients != len(counts):
            raise ValueError(f"clients={clients} but client_ids name {len(counts)} clients")
    else:
        if clients is None:
            raise ValueError("give the number of clients (or client_ids, one per example)")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        parts = split_indices(
            targets,
            clients,
            split=split,
            alpha=alpha,
            shards_per_worker=shards_per_worker,
            seed=seed,
            min_size=min_size,
        )
        order = torch.cat(parts)
        counts = torch.tensor([len(part) for part in parts])
        names = None
    return _place(data, targets, order, counts, names, executors)


def _by_client_id(
    client_ids: torch.Tensor, examples: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Examples grouped by client id (stable: each client's in data set order), sizes, names."""
    if not isinstance(client_ids, torch.Tensor) or client_ids.dim() != 1:
        raise TypeError("client_ids must be a 1-D tensor, one id per example")
    if client_ids.dtype.is_floating_point or client_ids.dtype.is_complex:
        raise TypeError("client_ids must be integers")
    if len(client_ids) != examples:
        raise ValueError(f"{examples} examples but {len(client_ids)} client ids")
    order = torch.argsort(client_ids, stable=True)
    ids, counts = torch.unique_consecutive(client_ids[order], return_counts=True)
    return order, counts, [f"client-{int(value)}" for value in ids.tolist()]


def _place(
    data: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    names: list[str] | None,
    executors: Sequence[WorkerHandle],
) -> SimulatedClients:
    """Send each executor one block of its clients' examples; make the clients."""
    starts = torch.cumsum(counts, 0) - counts  # each client's first position in ``order``
    bounds = torch.tensor_split(torch.arange(len(counts)), len(executors))
    shards: list[ClientShard] = []
    blocks: list[_Block] = []
    start_list, count_list = starts.tolist(), counts.tolist()
    for executor, pinned in zip(executors, bounds, strict=False):
        if not len(pinned):
            continue  # more executors than clients
        first, last = int(pinned[0]), int(pinned[-1])
        low, high = start_list[first], start_list[last] + count_list[last]
        rows = order[low:high]
        block = _Block(executor, send(data[rows], executor), send(targets[rows], executor))
        blocks.append(block)
        for client in range(first, last + 1):
            name = names[client] if names is not None else f"client-{client}"
            shards.append(
                ClientShard(
                    block,
                    start_list[client] - low,
                    start_list[client] + count_list[client] - low,
                    name,
                )
            )
    return SimulatedClients(shards, blocks)
